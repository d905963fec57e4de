#!/usr/bin/env bash
# Exact commands behind the DIFF numbers in the README. Run from the repository root.
set -euo pipefail
# Domain generalisation GTA5 -> Cityscapes (exp 50: 40k steps, batch 1, 37-step inversion, SD 2.1):
python diff.py --src gta5 --tgt cityscapes --out runs/diff-gta5-cityscapes
# Performance table: one JSON line with flops_per_iter, sec_per_iter, peak_mem_gb, matmul_peak_gflops, utilization,
# and, counted in the same run on the meta device, FLOPs per iteration of our structure and of the official one
# (stride-64 bottleneck, duplicated "" guidance pass, all 37 steps) for an image without / with prompted classes:
# flops_{no_prompt_class,prompt_classes}, flops_official_*, ratio_* (ours / official).
python diff.py --sd-model random-sd21 --profile 3 --crop-size 512 --device cuda
python diff.py --sd-model random-sd21 --profile 1 --crop-size 256 --device cpu --num-steps 5
# FLOPs ratio ours / official at SD 2.1 size, crop 512, 37 steps (meta device, no weights; about 2 minutes on the idle 2-core machine):
DIFF_SD21_FLOPS=1 python -m pytest -q -s tests/test_diff.py -k sd21_size
