#!/usr/bin/env bash
# Exact commands behind the ICCLD numbers in the README. Run from the repository root.
set -euo pipefail
python iccld.py --src gta5 --tgt cityscapes --out runs/iccld-gta5-cityscapes
python iccld.py --src synthia --tgt cityscapes --out runs/iccld-synthia-cityscapes
# Baseline row (source losses only in both stages):
python iccld.py --src gta5 --tgt cityscapes --source-only --out runs/iccld-gta5-cityscapes-source-only
python iccld.py --src synthia --tgt cityscapes --source-only --out runs/iccld-synthia-cityscapes-source-only
# Performance table (stage 1 and stage 2 separately):
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 1
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 2
python iccld.py --sd-model random-sd15 --profile 2 --crop-size 256 --device cpu --stage 1
python iccld.py --sd-model random-sd15 --profile 2 --crop-size 256 --device cpu --stage 2
# Low-memory setting (activation checkpointing of E/D in stage 1 and of the UNet in stage 2):
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 1 --grad-checkpointing
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 2 --grad-checkpointing
# Predicted peak GPU memory without a GPU (FakeTensorMode; bf16 as a bf16 GPU runs it, fp16 as a T4 runs it):
for stage in 1 2; do
  python iccld.py --sd-model random-sd15 --estimate-memory --stage $stage
  python iccld.py --sd-model random-sd15 --estimate-memory --stage $stage --grad-checkpointing
  python iccld.py --sd-model random-sd15 --estimate-memory --stage $stage --grad-checkpointing --precision fp16
done
