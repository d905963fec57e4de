#!/usr/bin/env bash
# Exact commands behind the DIFF numbers in the README. Run from the repository root.
set -euo pipefail
# Domain generalisation GTA5 -> Cityscapes (exp 50: 40k steps, batch 1, 37-step inversion, SD 2.1), and the
# paper's baseline row (unconditional branch only, L = CE_uncond):
python diff.py --src gta5 --tgt cityscapes --out runs/diff-gta5-cityscapes
python diff.py --src gta5 --tgt cityscapes --baseline --out runs/diff-gta5-cityscapes-baseline
# Performance table: one JSON line with flops_per_iter, sec_per_iter, peak_mem_gb, matmul_peak_gflops,
# utilization (a label holding all five prompt classes: the largest conditional batch).
python diff.py --sd-model random-sd21 --profile 3 --crop-size 512 --device cuda
python diff.py --sd-model random-sd21 --profile 1 --crop-size 256 --device cpu --num-steps 5
# FLOPs per iteration of our structure and of the official one (stride-64 bottleneck, duplicated "" guidance
# pass, all 37 steps, one UNet call per branch), for a label without / with the prompt classes, counted on the
# meta device (no weights): flops_{no_prompt_class,prompt_classes}, flops_official_*, ratio_* (ours /
# official).
python tests/diff_reference.py --arch sd21 --crop-size 256 --num-steps 5      # beside the CPU --profile row
python tests/diff_reference.py --arch sd21 --crop-size 512 --num-steps 37     # the paper setting
# The same paper-setting ratios as a test (<= 0.5 without, < 1 with prompt classes; ~2 minutes on the idle
# 2-core machine):
DIFF_SD21_FLOPS=1 python -m pytest -q -s tests/test_diff.py -k sd21_size
# Predicted peak GPU memory of one training step, without a GPU (FakeTensorMode + MemTracker): the paper
# setting (bf16 as on an Ampere GPU), with gradient checkpointing, and the README's Colab T4 setting (fp16).
python diff.py --sd-model random-sd21 --estimate-memory
python diff.py --sd-model random-sd21 --estimate-memory --grad-checkpointing
python diff.py --sd-model random-sd21 --estimate-memory --precision fp16 --grad-checkpointing --num-steps 5
DIFF_SD21=1 python -m pytest -q -s tests/test_diff.py -k paper_setting
