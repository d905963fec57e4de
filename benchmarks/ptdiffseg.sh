#!/usr/bin/env bash
# Exact commands behind the PTDiffSeg numbers in the README. Run from the repository root.
set -euo pipefail
# Domain generalisation GTA5 -> Cityscapes, BDD100K, Mapillary (40k steps, batch 2), then TTDA on Cityscapes:
python ptdiffseg.py --src gta5 --tgt cityscapes,bdd100k,mapillary --out runs/ptdiffseg-gta5
python ptdiffseg.py --src gta5 --tgt cityscapes --eval-only --ttda \
  --ckpt "$(ls -d runs/ptdiffseg-gta5/checkpoints/step_* | tail -n 1)" --out runs/ptdiffseg-gta5-ttda
# The baseline row (frozen SD features, one fixed scene prompt, no consistency loss, no TTDA):
python ptdiffseg.py --src gta5 --tgt cityscapes,bdd100k,mapillary --baseline --out runs/ptdiffseg-gta5-baseline
# Cityscapes -> Dark Zurich val (the number TADP Table 4 quotes):
python ptdiffseg.py --src cityscapes --tgt dark_zurich --out runs/ptdiffseg-cityscapes-dark_zurich
# Performance table:
python ptdiffseg.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda
python ptdiffseg.py --sd-model random-sd15 --profile 2 --crop-size 256 --device cpu
python ptdiffseg.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --grad-checkpointing
# Predicted peak GPU memory without a GPU (paper setting; the 16 GB setting of the README: fp16 + checkpointing):
python ptdiffseg.py --sd-model random-sd15 --estimate-memory
python ptdiffseg.py --sd-model random-sd15 --estimate-memory --precision fp16 --grad-checkpointing
