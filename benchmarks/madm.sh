#!/usr/bin/env bash
# Exact commands behind the MADM numbers in the README. Run from the repository root.
set -euo pipefail
# Paper settings (official configs; 10k steps, global batch 2 as two micro-steps of 1 source + 1 target):
python madm.py --src cityscapes --tgt dsec_event    --out runs/madm-cityscapes-dsec_event
python madm.py --src cityscapes --tgt fmb_infrared  --out runs/madm-cityscapes-fmb_infrared
python madm.py --src cityscapes --tgt deliver_depth --out runs/madm-cityscapes-deliver_depth
# The official 2-GPU layout (same maths as the accumulation above):
# torchrun --nproc_per_node 2 madm.py --src cityscapes --tgt dsec_event --out runs/madm-cityscapes-dsec_event-2gpu
# Baseline (the paper's source-only row): source CE + source LPLR, no teacher, no ClassMix, no mixed pass.
python madm.py --src cityscapes --tgt dsec_event --source-only --out runs/madm-cityscapes-dsec_event-source-only
# Predicted peak GPU memory of one training step without a GPU (FakeTensorMode + MemTracker; random-sd15 = the
# SD 1.x architecture of the paper's v1-4): paper setting (bf16, as --precision auto on a bf16 GPU), the official
# fp16, and the low-memory settings for 24 GB and for a 16 GB T4 (no bf16: fp16 + GradScaler).
python madm.py --sd-model random-sd15 --estimate-memory
python madm.py --sd-model random-sd15 --estimate-memory --precision fp16
python madm.py --sd-model random-sd15 --estimate-memory --grad-checkpointing
python madm.py --sd-model random-sd15 --estimate-memory --grad-checkpointing --fusion-stride 4
python madm.py --sd-model random-sd15 --estimate-memory --precision fp16 --grad-checkpointing --fusion-stride 4
# Performance table (random weights, no download): GPU at the paper crop, with and without the memory options;
# CPU at crop 256.
python madm.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda
python madm.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --grad-checkpointing
python madm.py --sd-model random-sd15 --profile 5 --crop-size 512 --device cuda --grad-checkpointing --fusion-stride 4
python madm.py --sd-model random-sd15 --profile 2 --crop-size 256 --device cpu
# The DAFormer head's FLOPs at crop 256 (one image, forward + backward) with our corrected conv-backward formula and with
# PyTorch's (which counts the depthwise ASPP's weight gradient as dense): the correction applied to the README's MADM row.
python -c "
import torch, madm
from benchmarks.measure import count_flops
from torch.utils.flop_counter import FlopCounterMode
with torch.device('meta'):
    head = madm.DAFormerHead([128, 512, 512, 512], 11)
f = [torch.zeros(1, 128, 256, 256, device='meta', requires_grad=True)] + [
    torch.zeros(1, 512, s, s, device='meta', requires_grad=True) for s in (32, 16, 8)]
ours = count_flops(lambda: head(f).sum().backward())
with FlopCounterMode(display=False) as m:
    head(f).sum().backward()
print('head fwd+bwd TFLOP: corrected', ours / 1e12, 'pytorch', m.get_total_flops() / 1e12)"
