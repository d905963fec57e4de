#!/usr/bin/env bash
# Exact commands behind the ICCLD numbers in the README. Run from the repository root.
set -euo pipefail
python iccld.py --src gta5 --tgt cityscapes --out runs/iccld-gta5-cityscapes
python iccld.py --src synthia --tgt cityscapes --out runs/iccld-synthia-cityscapes
# Performance table (stage 1 and stage 2 separately):
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 1
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 2
python iccld.py --sd-model random-sd15 --profile 2 --crop-size 256 --device cpu --stage 1
python iccld.py --sd-model random-sd15 --profile 2 --crop-size 256 --device cpu --stage 2
# Low-memory setting (activation checkpointing of E/D in stage 1 and of the UNet in stage 2):
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 1 --grad-checkpointing
python iccld.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --stage 2 --grad-checkpointing
