#!/usr/bin/env bash
# Exact commands behind the MADM numbers in the README. Run from the repository root.
set -euo pipefail
# Paper settings (official configs; 10k steps, global batch 2 as two micro-steps of 1 source + 1 target):
python madm.py --src cityscapes --tgt dsec_event    --out runs/madm-cityscapes-dsec_event
python madm.py --src cityscapes --tgt fmb_infrared  --out runs/madm-cityscapes-fmb_infrared
python madm.py --src cityscapes --tgt deliver_depth --out runs/madm-cityscapes-deliver_depth
# The official 2-GPU layout (same maths as the accumulation above):
# torchrun --nproc_per_node 2 madm.py --src cityscapes --tgt dsec_event --out runs/madm-cityscapes-dsec_event-2gpu
# Performance table (random weights, no download): GPU at the paper crop, with and without the memory options;
# CPU at crop 256.
python madm.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda
python madm.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --grad-checkpointing
python madm.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --grad-checkpointing --fusion-stride 4
python madm.py --sd-model random-sd15 --profile 2 --crop-size 256 --device cpu
