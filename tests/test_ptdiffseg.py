"""Tests of ptdiffseg.py: class-token attention maps, the losses, prompt embeddings and their cache, equivalence
of the optimisations (batched scene prompts, gradient checkpointing), the gradient path through the frozen UNet,
the two METHOD STEPs against the paper's losses written out here (train_step, ttda_step), the baseline row,
half precision on the CPU, --estimate-memory, TTDA touching nothing but the scene prompt, resume bit equality,
--profile, bad input, the SYNTHIA metrics, and the demo end to end (which doubles as the learning test).

Everything runs on CPU with the tiny random SD (loaded through from_pretrained) and the synthetic sample.
"""
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_two_gloo_processes, sigterm_on_call
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import ptdiffseg as P
from common import runs
from common.cli import Stopped, UserError, parse_args
from common.sd_backbone import encode_prompts, load_sd
from common.synthetic import ensure_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "synthetic"
NAMES = ("road", "sky", "car", "person", "vegetation")  # a small class set keeps the text-encoder pass short
# One thread per process: on a shared, oversubscribed CPU, OpenMP threads waiting on each other make the tiny
# model's steps tens of times slower than a single thread.
ENV1 = dict(os.environ, OMP_NUM_THREADS="1")
CPU = torch.device("cpu")
FP32 = P.choose_precision("fp32", CPU)
ONE = P.Dist(0, 1, CPU)  # one process


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """One tiny SD (all parts), its prompt embeddings for NAMES, a FrozenSD and an (eval-mode) PTDiffSeg."""
    sd = load_sd("tiny")
    c = P.class_embeddings(sd.tokenizer, sd.text_encoder, NAMES)
    s = encode_prompts(sd.tokenizer, sd.text_encoder, list(P.SCENE_PROMPTS), pooled=True).float()
    fsd = P.FrozenSD(sd.unet, sd.vae, timestep=1, latent_scale=True)
    torch.manual_seed(0)
    model = P.PTDiffSeg(c, s, fsd.channels, gamma_init=1e-4).eval()
    return sd, fsd, model


def demo_args(out, **kw) -> P.Args:
    """The demo's resolved configuration on the random tiny SD (the step tests and the mutation table are
    calibrated on it; the demo itself runs on mini) with overrides (TTDA off unless asked)."""
    args = P.resolve_args(P.Args(demo=True, sd_model="tiny", data_root=str(DATA), out=str(out)))
    return dataclasses.replace(args, **{"ttda": False, **kw})


def setup(args: P.Args) -> P.Run:
    """What `P.train` builds before its loop, in the same order (processes, precision, checks, data, frozen SD,
    prompt embeddings, model, the run folder and its prompt cache), for the tests of evaluation and TTDA."""
    dist, _ = P.init_distributed(args.device, args.deterministic)
    precision = P.choose_precision(args.precision, dist.device)
    K, out = P.check_args(args), Path(args.out)
    data = P.build_data(args, K)
    sd = P.FrozenSD.load(args, dist.device, precision.frozen_dtype)
    class_emb, scene_emb = P.prompt_embeddings(args.sd_model, P.cd.CLASS_SETS[K], out / "cache", write=False)
    model = P.PTDiffSeg(class_emb, scene_emb, sd.channels, args.adapter_gamma_init).to(dist.device)
    runs.prepare_out_dir(out, args.resume, args.demo, dist.is_main)
    P.save_prompt_cache(out / "cache", args.sd_model, P.cd.CLASS_SETS[K], class_emb, scene_emb)
    return P.Run(args, dist, precision, sd, model, out, K, data)


# ------------------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------------------
def test_attention_maps_shapes_and_rows_sum_to_one(tiny):
    sd, fsd, model = tiny
    K, B = len(NAMES), 2
    z = torch.randn(B, 4, 8, 8)                                                   # a 64x64 image's latent
    feats = fsd.features(z, model.context(model.scene_pool[:B]))
    c8, c16, c32, c64 = fsd.channels
    assert [tuple(f.shape) for f in feats] == [(B, c8, 8, 8), (B, c16 + K, 4, 4), (B, c32 + K, 2, 2),
                                               (B, c64, 1, 1)]
    # stored maps: every attn2 of down_blocks 1, 2 and up_blocks 1, 2 (2 + 2 + 3 + 3 layers), none elsewhere
    names = list(fsd.store.maps)
    assert len(names) == 10 and all(n.startswith(tuple(P.ATTENTION_BLOCKS)) for n in names)
    for name, p in fsd.store.maps.items():
        stride = P.ATTENTION_BLOCKS[next(b for b in P.ATTENTION_BLOCKS if name.startswith(b))]
        assert p.shape == (B, (64 // stride) ** 2, 1 + K)
        # softmax over all 1 + K tokens (scene included): rows sum to one before the scene column is dropped
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5, rtol=0)
        assert (p[..., 0] > 0).all()  # the scene column carries mass, so the K kept columns sum to < 1
    # the appended channels are the layer mean of the class columns at that stride
    A16 = torch.stack([p for n, p in fsd.store.maps.items()
                       if n.startswith(("down_blocks.1.", "up_blocks.2."))])
    expect = A16.mean(0)[:, :, 1:].transpose(1, 2).reshape(B, K, 4, 4)
    torch.testing.assert_close(feats[1][:, c16:], expect)


def test_consistency_loss_zero_for_identical_positive_otherwise():
    torch.manual_seed(0)
    one = torch.randn(2, 1, 5, 4, 4)
    same = one.repeat(1, 2, 1, 1, 1)                                              # (B, K_s, K, h, w)
    assert abs(P.consistency_loss(same).item()) < 1e-6
    diff = torch.randn(2, 2, 5, 4, 4, requires_grad=True)
    loss = P.consistency_loss(diff)
    assert loss.item() > 1e-3
    # hand-computed: mean_k mean_pix KL(p_k || p_bar)
    p = diff.detach().softmax(2)
    pbar = p.mean(1, keepdim=True)
    ref = (p * (p.log() - pbar.log())).sum(2).mean()
    torch.testing.assert_close(loss.detach(), ref, atol=1e-6, rtol=1e-5)
    # stop-gradient on the mean only: the gradient equals that of sum_k KL(p_k || const). Through p_bar the
    # gradient is zero anyway (dL/dlog p_bar_c = -p_bar_c, sum_c dp_bar_c = 0), so only the graph can show sg():
    # no node of the backward graph computes the mean (logsumexp over the prompts)
    def nodes(fn, seen):
        if fn is not None and fn not in seen:
            seen.add(fn)
            for nxt, _ in fn.next_functions:
                nodes(nxt, seen)
        return seen
    assert not any("Logsumexp" in type(f).__name__ for f in nodes(loss.grad_fn, set()))
    loss.backward()
    x = diff.detach().clone().requires_grad_(True)
    lp = x.log_softmax(2)
    ((lp.exp() * (lp - pbar.log())).sum(2).mean()).backward()
    torch.testing.assert_close(diff.grad, x.grad, atol=1e-7, rtol=1e-4)


def test_segmentation_loss_means_over_prompts_and_valid_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 5, 4, 4)
    y = torch.randint(0, 5, (2, 32, 32))
    y[0, :8] = 255
    up = lambda l: F.interpolate(l, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    ref = sum(F.cross_entropy(up(logits[:, k]), y, ignore_index=255) for k in range(2)) / 2
    torch.testing.assert_close(P.segmentation_loss(logits, y), ref)
    assert P.segmentation_loss(logits, torch.full_like(y, 255)).item() == 0.0  # all ignored: 0, not NaN


def test_scene_prompt_draws_are_distinct_and_stateless():
    def draw(step, start, count):
        return P.scene_prompt_indices(P.Args(seed=0, batch_size=count), step, start)

    a = draw(3, 0, 4)
    assert a.shape == (4, 2) and a.dtype == torch.long and (a[:, 0] != a[:, 1]).all() and a.max() < 12
    assert torch.equal(a, draw(3, 0, 4))
    assert torch.equal(a[2:], draw(3, 2, 2))  # rank 1 of 2 draws its own images
    assert not torch.equal(a, draw(4, 0, 4))
    many = torch.cat([draw(s, 0, 8) for s in range(50)])                          # (400, 2)
    assert set(many.flatten().tolist()) == set(range(len(P.SCENE_PROMPTS)))     # the whole pool is used
    # the baseline row: prompt 0 alone, whatever the step
    base = P.scene_prompt_indices(P.Args(baseline=True), 7, 0)
    assert torch.equal(base, torch.zeros(2, 1, dtype=torch.long))


def test_class_embeddings_template_average_and_disk_cache(tiny, tmp_path, monkeypatch):
    sd = tiny[0]
    c, s = P.prompt_embeddings("tiny", NAMES[:2], tmp_path)
    assert c.shape == (2, 32) and s.shape == (len(P.SCENE_PROMPTS), 32)
    # independent reference: each template on its own through the encoder, pooled EOS, plain mean
    one = torch.stack([encode_prompts(sd.tokenizer, sd.text_encoder, [t.format("sky")], pooled=True)[0]
                       for t in P.TEMPLATES]).mean(0)
    torch.testing.assert_close(c[1], one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(c[0], c[1])
    assert P.TEMPLATES[0] == "a bad photo of a {}." and P.TEMPLATES[-1] == "a tattoo of the {}."
    assert len(set(P.TEMPLATES)) == 80 and all(t.count("{}") == 1 for t in P.TEMPLATES)
    # scene tokens: the pooled EOS of each sentence, no template
    torch.testing.assert_close(s[2], encode_prompts(sd.tokenizer, sd.text_encoder, [P.SCENE_PROMPTS[2]],
                                                    pooled=True)[0], atol=1e-5, rtol=1e-5)
    # the cache is keyed by (model id, class names) and a hit never loads the text encoder
    files = list(tmp_path.glob("prompt_embeddings-*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(P, "load_sd", lambda *a, **k: pytest.fail("text encoder loaded on a cache hit"))
    c2, s2 = P.prompt_embeddings("tiny", NAMES[:2], tmp_path)
    assert torch.equal(c, c2) and torch.equal(s, s2)
    loads = []
    monkeypatch.setattr(P, "load_sd", lambda m, **k: loads.append(m) or load_sd("tiny", **k))
    P.prompt_embeddings("tiny", NAMES[:3], tmp_path)          # other classes: a miss, a second file
    P.prompt_embeddings("other-model", NAMES[:2], tmp_path)   # another model id: a miss, a third file
    assert loads == ["tiny", "other-model"] and len(list(tmp_path.glob("prompt_embeddings-*"))) == 3


# ------------------------------------------------------------------------------------------------------------
# Optimisations: each against the plain computation
# ------------------------------------------------------------------------------------------------------------
def test_batched_scene_prompts_equal_per_prompt_unet_calls(tiny):
    _, fsd, model = tiny
    torch.manual_seed(1)
    z = torch.randn(2, 4, 8, 8)
    idx = torch.tensor([[0, 5], [3, 11]])                                         # (B, K_s)
    with torch.no_grad():
        batched = model(fsd, z.repeat_interleave(2, 0), model.scene_pool[idx.flatten()]).view(2, 2, -1, 8, 8)
        for k in range(2):  # one UNet call per prompt, as a naive implementation would do
            single = model(fsd, z, model.scene_pool[idx[:, k]])
            torch.testing.assert_close(batched[:, k], single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[:, 0], batched[:, 1])  # the scene token does change the prediction


def _adapter_grads(model, fsd, z, scene, y):
    model.zero_grad(set_to_none=True)
    logits = model(fsd, z, scene)[:, None]                                        # (B, 1, K, h, w)
    P.segmentation_loss(logits, y).backward()
    return [p.grad.clone() for p in model.adapter.parameters()]


def test_gradient_reaches_adapter_through_frozen_unet_and_checkpointing_matches(tiny):
    _, fsd, model = tiny
    torch.manual_seed(2)
    z, y = torch.randn(2, 4, 8, 8), torch.randint(0, len(NAMES), (2, 64, 64))
    scene = model.scene_pool[[0, 3]]
    plain = _adapter_grads(model, fsd, z, scene, y)
    assert all(g.abs().sum() > 0 for g in plain)  # the adapter's only way to the loss is the UNet
    assert not any(p.requires_grad or p.grad is not None for p in fsd.unet.parameters())
    fsd.unet.enable_gradient_checkpointing()
    try:
        ckpt = _adapter_grads(model, fsd, z, scene, y)
    finally:
        fsd.unet.disable_gradient_checkpointing()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the frozen UNet's storage on a GPU needs CUDA")
def test_frozen_parts_half_precision_on_cuda(tmp_path):
    ensure_synthetic_sample(DATA)
    run = setup(demo_args(tmp_path, device="cuda"))
    assert run.sd.unet.dtype in (torch.float16, torch.bfloat16) and run.sd.vae.dtype == run.sd.unet.dtype
    assert all(p.dtype == torch.float32 for p in run.model.parameters())


# ------------------------------------------------------------------------------------------------------------
# The training METHOD STEP against the paper's loss, written out here independently
# ------------------------------------------------------------------------------------------------------------
def ref_logits(model, fsd, x, idx):
    """logits[i][k] (K, h, w) of image i under its k-th scene prompt: the (image, prompt) pairs are listed here
    one by one, on the VAE posterior mode x 0.18215 computed here (not through FrozenSD.encode). They go through
    the model in one call, in the order a correct step uses, so that float rounding matches (eval mode: every
    row is computed on its own)."""
    with torch.no_grad():
        z = fsd.vae.encode(x).latent_dist.mode() * 0.18215
    pairs = [(i, k) for i in range(len(x)) for k in range(idx.shape[1])]
    scenes = torch.stack([model.scene_pool[idx[i, k]] for i, k in pairs])
    out = model(fsd, torch.stack([z[i] for i, _ in pairs]), scenes)
    return [[out[pairs.index((i, k))] for k in range(idx.shape[1])] for i in range(len(x))]


def ref_train_loss(logits, y, lam):
    """L = (1/K_s) sum_k CE_k (mean over the valid pixels of all images) + lam (1/K_s) sum_k mean_pixels
    KL(p_k || sg(p_bar)), from the per-(image, prompt) logits."""
    Ks, n_valid, ce, cons = len(logits[0]), (y != 255).sum(), 0.0, 0.0
    for i, per_prompt in enumerate(logits):
        valid = y[i] != 255
        for lg in per_prompt:
            up = F.interpolate(lg[None], size=y.shape[-2:], mode="bilinear", align_corners=False)[0]
            logp = up.log_softmax(0)
            ce = ce - logp.permute(1, 2, 0)[valid].gather(1, y[i][valid][:, None]).sum()
        p = torch.stack([lg.softmax(0) for lg in per_prompt])                     # (K_s, K, h, w)
        p_bar = p.mean(0).detach()
        cons = cons + (p * (p.log() - p_bar.log())).sum(1).mean()
    ce = ce / (Ks * n_valid) if n_valid else torch.zeros(())  # no labelled pixel: no CE term
    return ce + lam * cons / len(logits), float(ce.detach()), float(cons.detach()) / len(logits)


def lr_factor(step, total, warmup):
    """DAFormer poly10warm: poly (1 - step/total), times the linear warm-up 1e-6 -> 1 over `warmup` steps."""
    return (1 - step / total) * (1e-6 + (1 - 1e-6) * step / warmup if step < warmup else 1.0)


def adamw(p, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Decoupled weight decay, then Adam with bias correction (Loshchilov & Hutter), step by step."""
    m = v = torch.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        p = p * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p


def close(a, b, rel=1e-4):
    """Equal up to float rounding (a different summation order): relative to the norm of the reference."""
    return a is not None and b is not None and float((a - b).norm()) <= rel * float(b.norm()) + 1e-12


def _step_case(tiny, lam=1.0, ignore_all=False, **kw):
    _, fsd, model0 = tiny
    # eval mode: BN running statistics and no dropout, so the per-(image, prompt) reference computes the very
    # same logits as the step's batched call (BN batch statistics are no part of the step)
    model = copy.deepcopy(model0).eval()
    model.adapter.gamma.data.fill_(0.3)  # a trained-looking adapter, so its gradients are not ~1e-4 x the rest
    args = P.Args(iters=20, warmup_iters=5, crop_size=64, consistency_weight=lam, **kw)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = torch.randint(0, len(NAMES), (2, 64, 64), generator=g)
    y[0, :20] = 255                                                               # ignored pixels
    if ignore_all:
        y[:] = 255
    return fsd, model, args, x, y, P.make_optimizer(model, args), FP32.make_scaler()


def test_train_step_gradients_lr_and_update_equal_the_papers_loss(tiny):
    """Two real steps (one in warm-up, one after): the losses, every parameter gradient and the AdamW update of
    every group equal those of L = mean_k CE_k + lambda KL-to-sg(mean), computed per (image, prompt) here."""
    fsd, model, args, x, y, opt, scaler = _step_case(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unet_before = [p.clone() for p in fsd.unet.parameters()]
    grads, lrs = {n: [] for n in before}, []
    for step, idx in ((3, torch.tensor([[0, 5], [3, 11]])), (7, torch.tensor([[2, 7], [9, 1]]))):
        ref = copy.deepcopy(model)                                                # the parameters of this step
        L, L_ce, L_cons = ref_train_loss(ref_logits(ref, fsd, x, idx), y, 1.0)
        g_ref = torch.autograd.grad(L, list(ref.parameters()), allow_unused=True)
        logs = P.train_step(model, fsd, opt, scaler, x, y, idx, step, args, FP32)
        assert logs["loss_ce"] == pytest.approx(L_ce, rel=1e-4)
        assert logs["loss_cons"] == pytest.approx(L_cons, rel=2e-3) and logs["loss_cons"] > 0
        for (n, p), g in zip(model.named_parameters(), g_ref):
            assert g is not None and close(p.grad, g), n                          # every trained part, right
            grads[n].append(p.grad.clone())
        f = lr_factor(step, 20, 5)
        assert [gr["lr"] for gr in opt.param_groups] == pytest.approx([6e-4 * f, 6e-4 * f, 6e-5 * f])
        assert logs["lr"] == pytest.approx(6e-4 * f)
        lrs.append(f)
    # the update: AdamW with the head's lr on FPN + head, the adapter's on the adapter, no decay on BatchNorm
    for n, p in model.named_parameters():
        base = 6e-5 if n.startswith("adapter.") else 6e-4
        wd = 0.0 if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d) else 0.01
        expect = adamw(before[n], grads[n], [base * f for f in lrs], wd)
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-7, msg=n)
    assert all(torch.equal(a, b) for a, b in zip(unet_before, fsd.unet.parameters()))  # frozen UNet untouched


def test_train_step_consistency_term_alone_has_its_weight_sign_and_stop_gradient(tiny):
    """All labels ignored: the CE term is 0, so the whole gradient is lambda x grad KL(p_k || sg(p_bar))."""
    fsd, model, args, x, y, opt, scaler = _step_case(tiny, lam=2.5, ignore_all=True)
    idx = torch.tensor([[0, 5], [3, 11]])
    ref = copy.deepcopy(model)
    L, L_ce, L_cons = ref_train_loss(ref_logits(ref, fsd, x, idx), y, 2.5)
    assert L_ce == 0.0 and L_cons > 0
    g_ref = torch.autograd.grad(L, list(ref.parameters()), allow_unused=True)
    logs = P.train_step(model, fsd, opt, scaler, x, y, idx, 3, args, FP32)
    assert logs["loss_ce"] == 0.0 and logs["loss_cons"] == pytest.approx(L_cons, rel=2e-3)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        if n.startswith("head.scale_heads"):  # BN's shift of an unused branch can have an exact zero gradient
            continue
        # KL's gradient sums nearly cancelling terms: our log(softmax) and the step's log_softmax round apart
        assert g is not None and float(g.norm()) > 0 and close(p.grad, g, rel=3e-3), n


def test_train_step_baseline_is_ce_with_prompt_0_only(tiny, monkeypatch):
    """--baseline: one UNet row per image with scene prompt 0, the CE alone; the consistency loss never runs."""
    fsd, model, args, x, y, opt, scaler = _step_case(tiny, baseline=True)
    idx = P.scene_prompt_indices(args, 3, 0)
    assert torch.equal(idx, torch.zeros(2, 1, dtype=torch.long))
    monkeypatch.setattr(P, "consistency_loss", lambda *a: pytest.fail("consistency loss in the baseline"))
    rows = []
    hook = fsd.unet.register_forward_pre_hook(lambda m, a, kw: rows.append(a[0].shape[0]), with_kwargs=True)
    ref = copy.deepcopy(model)
    L, L_ce, _ = ref_train_loss(ref_logits(ref, fsd, x, idx), y, 0.0)
    g_ref = torch.autograd.grad(L, list(ref.parameters()), allow_unused=True)  # lam = 0: the CE alone
    rows.clear()
    try:
        logs = P.train_step(model, fsd, opt, scaler, x, y, idx, 3, args, FP32)
    finally:
        hook.remove()
    assert rows == [2] and logs["loss_cons"] == 0.0 and logs["loss_ce"] == pytest.approx(L_ce, rel=1e-4)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        assert close(p.grad, g), n
    with pytest.raises(UserError, match="--baseline"):
        P.check_args(P.Args(baseline=True, ttda=True))
    assert not P.resolve_args(P.Args(demo=True, baseline=True, data_root=str(DATA))).ttda


def test_param_groups_follow_daformer_weight_decay():
    torch.manual_seed(0)
    model = P.PTDiffSeg(torch.randn(5, 32), torch.randn(12, 32), [16, 32, 64, 64], 1e-4)
    opt = P.make_optimizer(model, P.Args())
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    adapter = {id(p) for p in model.adapter.parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if id(p) in bn else 0.01)
            assert g["lr"] == g["base_lr"] == (6e-5 if id(p) in adapter else 6e-4)
    assert bn and id(model.adapter.gamma) in adapter and opt.defaults["betas"] == (0.9, 0.999)


# ------------------------------------------------------------------------------------------------------------
# The TTDA METHOD STEP
# ------------------------------------------------------------------------------------------------------------
class FakeDist:
    """Two processes: the other one's contribution is added by all_reduce_sum."""
    world, rank, is_main = 2, 0, True

    def __init__(self, other_kept: float, other_grad: torch.Tensor):
        self.other_kept, self.other_grad = other_kept, other_grad

    def all_reduce_sum(self, t):
        t += self.other_kept if t.numel() == 1 else self.other_grad
        return t


def _ttda_case(tiny, precision=FP32, fsd=None):
    _, fsd32, model0 = tiny
    model = copy.deepcopy(model0).eval().requires_grad_(False)
    s0 = model.scene_pool[:1].clone()
    s = nn.Parameter(model.scene_pool[5:6].clone())  # not prompt 0: pseudo labels from s would differ
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    return fsd or fsd32, model, s, s0, torch.optim.AdamW([s], lr=1e-2, weight_decay=0.0), x


def ref_ttda(model, fsd, s, s0, x, thr):
    """CE of the logits with s against argmax of the frozen prompt-0 model, on pixels with p_max >= thr."""
    with torch.no_grad():
        z = fsd.vae.encode(x).latent_dist.mode() * 0.18215
        up = lambda lg: F.interpolate(lg, size=x.shape[-2:], mode="bilinear", align_corners=False)  # noqa
        conf, y_hat = up(model(fsd, z, s0.expand(2, -1))).softmax(1).max(1)
    keep = conf >= thr
    s_ = s.detach().clone().requires_grad_(True)
    logp = up(model(fsd, z, s_.expand(2, -1))).log_softmax(1)
    loss = -logp.gather(1, y_hat[:, None])[:, 0][keep].sum() / keep.sum()
    return loss.detach(), torch.autograd.grad(loss, s_)[0], keep, y_hat, conf


def test_ttda_step_equals_pseudo_label_ce_and_touches_only_s(tiny):
    fsd, model, s, s0, opt, x = _ttda_case(tiny)
    _, _, keep0, y0, conf = ref_ttda(model, fsd, s, s0, x, 0.0)
    thr = float(conf.median())  # about half the pixels kept: the threshold matters
    _, _, keep_s, y_s, _ = ref_ttda(model, fsd, s, s, x, thr)   # what pseudo labels from s would keep
    assert not (torch.equal(keep_s, conf >= thr) and torch.equal(y_s, y0))  # so the source of labels shows
    frozen = {n: p.clone() for n, p in [*model.state_dict().items(), *fsd.unet.state_dict().items()]}
    s_hist, g_hist, grad_mode = [s.detach().clone()], [], []
    for step in range(2):
        loss, g, keep, _, _ = ref_ttda(model, fsd, s, s0, x, thr)
        hook = model.register_forward_pre_hook(lambda m, a: grad_mode.append(torch.is_grad_enabled()))
        logs = P.ttda_step(model, fsd, s, s0, opt, FP32.make_scaler(), x, step, thr, FP32, ONE)
        hook.remove()
        assert logs["stepped"] == 1.0 and logs["kept"] == pytest.approx(float(keep.float().mean()))
        assert logs["loss_ttda"] == pytest.approx(float(loss), rel=1e-4) and 0 < logs["kept"] < 1
        assert close(s.grad, g, rel=1e-3)
        g_hist.append(g)
        s_hist.append(s.detach().clone())
    torch.testing.assert_close(s_hist[-1], adamw(s_hist[0], g_hist, [1e-2, 1e-2], 0.0), rtol=1e-5, atol=1e-6)
    assert grad_mode == [False, True] * 2  # the pseudo-label pass keeps no graph; the pass with s does
    now = {n: p for n, p in [*model.state_dict().items(), *fsd.unet.state_dict().items()]}
    assert all(torch.equal(frozen[n], now[n]) for n in frozen)
    assert all(p.grad is None for p in [*model.parameters(), *fsd.unet.parameters()])


def test_ttda_step_skips_when_no_pixel_is_kept_and_averages_over_processes(tiny):
    fsd, model, s, s0, opt, x = _ttda_case(tiny)
    one = ONE
    P.ttda_step(model, fsd, s, s0, opt, FP32.make_scaler(), x, 0, 0.0, FP32, one)  # Adam now has momentum
    s1 = s.detach().clone()
    logs = P.ttda_step(model, fsd, s, s0, opt, FP32.make_scaler(), x, 1, 1.01, FP32, one)
    assert logs == {"loss_ttda": 0.0, "kept": 0.0, "stepped": 0.0} and torch.equal(s.detach(), s1)
    assert opt.state[s]["step"] == 1  # the skipped step is no optimizer step
    with pytest.raises(UserError, match="non-finite loss .* at step 5"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(P, "ttda_loss", lambda *a: (torch.tensor(float("nan"), requires_grad=True), 0.5))
            P.ttda_step(model, fsd, s, s0, opt, FP32.make_scaler(), x, 5, 0.0, FP32, one)
    # two processes, this one without confident pixels: the other's gradient, averaged, still moves s
    G = torch.randn_like(s)
    logs = P.ttda_step(model, fsd, s, s0, opt, FP32.make_scaler(), x, 2, 1.01, FP32, FakeDist(1.0, G))
    assert logs["stepped"] == 1.0 and torch.equal(s.grad, G / 2) and not torch.equal(s.detach(), s1)
    # this process with pixels, the other without: the average is half this process's gradient
    _, g, _, _, _ = ref_ttda(model, fsd, s, s0, x, 0.0)
    P.ttda_step(model, fsd, s, s0, opt, FP32.make_scaler(), x, 3, 0.0, FP32, FakeDist(0.0, torch.zeros_like(s)))
    assert close(s.grad, g / 2, rel=1e-3)


DDP_CHILD = """
import copy, sys, torch
import ptdiffseg as P
from common import runs
from common.sd_backbone import encode_prompts, load_sd
torch.set_num_threads(1)
dist, _ = P.init_distributed("cpu", False)
sd = load_sd("tiny")
c = P.class_embeddings(sd.tokenizer, sd.text_encoder, ("road", "sky", "car", "person", "vegetation"))
s = encode_prompts(sd.tokenizer, sd.text_encoder, list(P.SCENE_PROMPTS), pooled=True).float()
fsd = P.FrozenSD(sd.unet, sd.vae, timestep=1, latent_scale=True)
torch.manual_seed(0)
model = P.PTDiffSeg(c, s, fsd.channels, gamma_init=0.3).eval()   # eval: no BN batch statistics
args = P.Args(iters=20, warmup_iters=5, crop_size=64)
fp32 = P.choose_precision("fp32", torch.device("cpu"))
g = torch.Generator().manual_seed(11)                               # the global batch, the same in every process
x, y = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.randint(0, 5, (2, 64, 64), generator=g)
idx = torch.tensor([[0, 5], [3, 11]])
out = {"init": {n: p.detach().clone() for n, p in model.named_parameters()}}
if dist.rank == 0:                                                  # the same step, one process, batch 2
    one = copy.deepcopy(model)
    P.train_step(one, fsd, P.make_optimizer(one, args), fp32.make_scaler(), x, y, idx, 3, args, fp32)
    out["one"] = {n: p.grad.clone() for n, p in one.named_parameters()}
r = dist.rank                                                       # this process's slice of the global batch
P.train_step(dist.wrap(model), fsd, P.make_optimizer(model, args), fp32.make_scaler(), x[r:r + 1], y[r:r + 1],
             idx[r:r + 1], 3, args, fp32)
out["ddp"] = {n: p.detach().clone() for n, p in model.named_parameters()}
out["grad"] = {n: p.grad.clone() for n, p in model.named_parameters()}     # after DDP's all-reduce
torch.save(out, sys.argv[1] + f"/rank{r}.pt")
"""


def test_ddp_two_processes_stay_in_sync_and_equal_one_process_with_the_global_batch(tmp_path):
    """2 gloo processes with one image each vs 1 process with both: DDP averages the gradients, so both replicas
    end the step with identical weights, and the averaged gradient equals the one-process gradient up to
    float rounding (no ignored pixel, so every image weighs the same in the CE mean; eval-mode BN, as torchrun
    on CPU has no SyncBN). Gradients, not weights: Adam's first step is ~lr x sign(g), which turns rounding of
    near-zero gradients into full-size weight differences."""
    r0, r1 = run_two_gloo_processes(DDP_CHILD, tmp_path, ENV1)
    moved = 0
    for n, p in r0["ddp"].items():
        assert torch.equal(r0["init"][n], r1["init"][n]), n
        torch.testing.assert_close(p, r1["ddp"][n], rtol=0, atol=1e-7, msg=f"replicas differ: {n}")
        assert close(r0["grad"][n], r0["one"][n]), f"DDP gradient != one-process gradient: {n}"
        moved += not torch.equal(p, r0["init"][n])
    assert moved == len(r0["ddp"])                                  # every trained tensor took the step


# ------------------------------------------------------------------------------------------------------------
# Half precision on the CPU: exactly the GPU's code path (frozen parts in half, autocast, GradScaler for fp16)
# ------------------------------------------------------------------------------------------------------------
def _rel(a, b):
    """Relative error |a - b| / |b| (scale-sensitive: a gradient left scaled by the GradScaler fails)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name,tol,grad_tol", [("bf16", 0.05, 0.25), ("fp16", 0.01, 0.15)])
def test_half_precision_train_and_ttda_steps_on_cpu(tiny, name, tol, grad_tol):
    """A few steps of each loop: finite losses, the scaler state (fp16: scale kept and growth tracker counting,
    or halved after an overflow; bf16: no scaler), the head autocast to half, and the first step's loss and
    gradients close to fp32 (loss within `tol`, every gradient within `grad_tol`, both relative)."""
    prec = P.choose_precision(name, CPU)
    half = prec.frozen_dtype
    fsd_h = P.FrozenSD.load(P.Args(sd_model="tiny"), CPU, half)
    assert fsd_h.unet.dtype == fsd_h.vae.dtype == half
    assert P.FrozenSD.load(P.Args(sd_model="tiny"), CPU, FP32.frozen_dtype).unet.dtype == torch.float32
    fsd, model32, args, x, y, opt32, sc32 = _step_case(tiny)
    idx = torch.tensor([[0, 5], [3, 11]])
    model = copy.deepcopy(model32)
    ref = P.train_step(model32, fsd, opt32, sc32, x, y, idx, 3, args, FP32)
    opt, scaler = P.make_optimizer(model, args), prec.make_scaler()
    assert scaler.is_enabled() == (name == "fp16")
    dtypes = []
    hook = model.head.conv_seg.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    moved = []
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        logs = P.train_step(model, fsd_h, opt, scaler, x, y, idx, 3 + step, args, prec)
        assert all(v == v and abs(v) < 1e4 for v in logs.values())  # finite
        if step == 0:
            assert logs["loss_ce"] == pytest.approx(ref["loss_ce"], rel=tol)
            errs = [_rel(p.grad, q.grad) for p, q in zip(model.parameters(), model32.parameters())
                    if q.grad is not None and q.grad.norm() > 0]
            assert max(errs) < grad_tol  # measured: bf16 0.11, fp16 0.08 (largest over the parameters)
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
    hook.remove()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # trained weights stay fp32
    assert dtypes and set(dtypes) == {half}  # the trained head ran under autocast
    check_scaler(scaler, name, moved)
    # the TTDA loop under the same precision
    _, model_t, s, s0, opt_t, xt = _ttda_case(tiny)
    _, g32, _, _, _ = ref_ttda(model_t, fsd, s, s0, xt, 0.0)
    scaler_t, moved, dtypes = prec.make_scaler(), [], []
    hook = model_t.head.conv_seg.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    for step in range(3):
        s_before = s.detach().clone()
        logs = P.ttda_step(model_t, fsd_h, s, s0, opt_t, scaler_t, xt, step, 0.0, prec, ONE)
        assert logs["stepped"] == 1.0 and abs(logs["loss_ttda"]) < 1e4 and torch.isfinite(s).all()
        if step == 0:
            assert _rel(s.grad, g32) < grad_tol  # unscaled before the update (measured: bf16 0.07, fp16 0.03)
        moved.append(not torch.equal(s.detach(), s_before))
    hook.remove()
    assert dtypes == [half] * 6  # both passes of every step (pseudo labels, then with s) under autocast
    check_scaler(scaler_t, name, moved)


def check_scaler(scaler, name, moved):
    """bf16: no scaler. fp16: the scale starts at 2^16, halves after every overflow (a skipped step: nothing
    moved) and the growth tracker counts the good steps since the last overflow."""
    if name == "bf16":
        assert not scaler.is_enabled()
        return
    n_inf = moved.count(False)
    run_ok = len(moved) - 1 - max([i for i, m in enumerate(moved) if not m], default=-1)
    assert scaler.get_scale() == 65536.0 * 0.5 ** n_inf and scaler._growth_tracker == run_ok


# ------------------------------------------------------------------------------------------------------------
# --estimate-memory, --profile
# ------------------------------------------------------------------------------------------------------------
def test_estimate_memory_counts_the_parameter_bytes_and_writes_nothing(tmp_path, monkeypatch):
    """--sd-model tiny, no data: the predicted parameter bytes are exactly those of the frozen UNet + VAE in bf16
    (what --precision auto runs on a bf16 GPU) and the trained adapter + FPN + head in fp32."""
    out = tmp_path / "est"
    res = P.main(P.Args(estimate_memory=True, sd_model="tiny", crop_size=64, out=str(out),
                        data_root=str(tmp_path / "no-data")))
    sd = load_sd("tiny", parts=("unet", "vae"))
    model = P.PTDiffSeg(torch.zeros(19, 32), torch.zeros(12, 32), list(sd.unet.config.block_out_channels), 1e-4)
    frozen = sum(p.numel() for m in (sd.unet, sd.vae) for p in m.parameters())
    trained = sum(p.numel() for p in model.parameters())
    assert res["parameters_bytes"] == 2 * frozen + 4 * trained
    assert res["unet_batch"] == 4 and res["predicted_peak_gb"] > res["parameters_gb"] and not out.exists()


@pytest.mark.slow
def test_estimate_memory_at_the_paper_setting_allocates_nothing(tmp_path):
    """random-sd15 (SD 1.5's architecture), crop 512, batch 2 x 2 prompts, in a subprocess: it completes, its
    peak resident memory stays far below SD 1.5's 1.9 GB of bf16 weights, and the prediction holds them."""
    t = time.time()
    # the child reports its own peak RSS (RUSAGE_CHILDREN would include every earlier subprocess of the session)
    # it reports the growth over its RSS after the imports: a CUDA build of torch alone maps ~1 GB at import
    script = ("import resource, sys, ptdiffseg\nfrom common.cli import parse_args\n"
              "rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "ptdiffseg.main(parse_args(ptdiffseg.Args, sys.argv[1:]))\n"
              "print('RSS', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)\n")
    r = subprocess.run([sys.executable, "-c", script, "--sd-model", "random-sd15", "--estimate-memory",
                        "--data-root", str(tmp_path / "no-data"), "--out", str(tmp_path / "x")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=ENV1)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    res, rss = json.loads(lines[-2]), int(lines[-1].split()[1])
    assert res["parameters_gb"] > 1.8 and res["predicted_peak_gb"] > res["parameters_gb"]
    assert rss < 1.0e9, f"peak RSS grew by {rss / 1e9:.2f} GB"
    print(f"random-sd15 --estimate-memory: RSS +{rss / 1e9:.2f} GB, {time.time() - t:.0f} s, predicted peak {res['predicted_peak_gb']} GB")


def test_profile_runs_without_data_and_writes_nothing(tmp_path):
    out = tmp_path / "prof"
    res = P.main(P.Args(profile=1, sd_model="tiny", crop_size=64, data_root=str(tmp_path / "no-data"),
                        out=str(out)))
    assert res["flops_per_iter"] > 0 and res["sec_per_iter"] > 0 and res["unet_batch"] == 4
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# TTDA, resume, eval-only, bad input, SYNTHIA metrics
# ------------------------------------------------------------------------------------------------------------
def _snapshot(run):
    t = {f"model.{k}": v.clone() for k, v in run.model.state_dict().items()}
    t.update({f"buf.{k}": v.clone() for k, v in run.model.named_buffers()})
    t.update({f"unet.{k}": v.clone() for k, v in run.sd.unet.state_dict().items()})
    t.update({f"vae.{k}": v.clone() for k, v in run.sd.vae.state_dict().items()})
    return t


def test_ttda_changes_only_the_scene_prompt(tmp_path):
    ensure_synthetic_sample(DATA)
    P.seed_everything(0)
    run = setup(demo_args(tmp_path, ttda=True, ttda_steps=2, ttda_threshold=0.0, ttda_lr=1e-2))
    run.model.train()  # TTDA must switch to eval mode itself (BN statistics untouched) and restore the mode
    before = _snapshot(run)
    res, learned = P.ttda(run, 0, {"cityscapes": {"miou": 0.0}})
    after = _snapshot(run)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"TTDA modified {changed[:5]}"
    s = learned["cityscapes"]
    assert s.shape == (1, run.sd.d) and not torch.equal(s, run.model.scene_pool[:1])
    assert run.model.training and all(p.requires_grad for p in run.model.parameters())
    assert all(p.grad is None for p in [*run.model.parameters(), *run.sd.unet.parameters()])  # s alone
    assert res["ttda"]["cityscapes"]["stepped"] == 2 and res["ttda"]["cityscapes"]["miou_before"] == 0.0


def test_resume_is_bit_identical_and_eval_only_ttda(tmp_path):
    """4 steps with a checkpoint every 2; drop the step-4 checkpoint; --resume from step 2 must rebuild it
    exactly. Then --eval-only --ckpt --ttda on that checkpoint reports mIoU before and after."""
    ensure_synthetic_sample(DATA)
    args = demo_args(tmp_path / "run", iters=4, ckpt_every=2, keep_ckpts=0, eval_every=1000, log_every=2)
    P.train(args)
    ck = tmp_path / "run" / "checkpoints"
    w4 = load_file(str(ck / "step_0000004" / "weights.safetensors"))
    w2 = load_file(str(ck / "step_0000002" / "weights.safetensors"))
    assert any(not torch.equal(w2[k], w4[k]) for k in w4)
    os.rename(ck / "step_0000004", tmp_path / "uninterrupted")
    args_r = dataclasses.replace(args, resume=True)
    # train seeds afresh: the resumed run must restore every RNG state from the checkpoint (without them, step
    # 3 would draw the head's dropout masks of step 1)
    P.train(args_r)
    w4r = load_file(str(ck / "step_0000004" / "weights.safetensors"))
    assert w4.keys() == w4r.keys()
    assert all(torch.equal(w4[k], w4r[k]) for k in w4), "resumed weights differ from the uninterrupted run"

    out = P.main(P.Args(demo=True, sd_model="tiny", data_root=str(DATA), eval_only=True,
                        ckpt=str(tmp_path / "uninterrupted"),
                        ttda_steps=2, out=str(tmp_path / "eval")))
    rec = out["ttda"]["cityscapes"]
    assert 0.0 <= rec["miou_before"] <= 1.0 and 0.0 <= rec["miou_after"] <= 1.0 and out["step"] == 4
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["ttda"]["cityscapes"]["miou_before"] == pytest.approx(rec["miou_before"])
    assert {e["prompt"] for e in saved["evals"]} == {"source prompt", "TTDA prompt"}
    assert (tmp_path / "eval" / "ttda" / "cityscapes_scene.safetensors").is_file()


def test_sigterm_in_training_and_in_ttda_then_resume_is_bit_identical(tmp_path, monkeypatch):
    """SIGTERM during training step 2 of 3 (no periodic checkpoint): its checkpoint is written and the run
    stops; --resume, SIGTERM during TTDA step 2: the run stops on the final training checkpoint (TTDA has no
    state worth keeping: it starts over); --resume: the weights, the learned scene token and the scores equal
    those of the uninterrupted run, bit for bit."""
    ensure_synthetic_sample(DATA)
    args = P.Args(demo=True, data_root=str(DATA), iters=3, ckpt_every=100, eval_every=100, log_every=1,
                  ttda_steps=3)
    full = P.main(dataclasses.replace(args, out=str(tmp_path / "full")))
    out = str(tmp_path / "cut")
    monkeypatch.setattr(P, "train_step", sigterm_on_call(P.train_step, 2))
    with pytest.raises(Stopped, match=r"^stopped by SIGTERM at step 2: checkpoint written, continue"):
        P.main(dataclasses.replace(args, out=out))
    assert runs.latest_checkpoint(Path(out)).name == "step_0000002"
    monkeypatch.undo()
    monkeypatch.setattr(P, "ttda_step", sigterm_on_call(P.ttda_step, 2))
    with pytest.raises(Stopped) as e:
        P.main(dataclasses.replace(args, out=out, resume=True))
    assert str(e.value) == ("stopped by SIGTERM at step 3: checkpoint written, continue with --resume "
                            "(TTDA on cityscapes starts over; it stopped after step 2 of 3)")
    assert not (tmp_path / "cut" / "ttda").exists()
    monkeypatch.undo()
    res = P.main(dataclasses.replace(args, out=out, resume=True))
    for name in ("checkpoints/step_0000003/weights.safetensors", "ttda/cityscapes_scene.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert res["miou"] == full["miou"] and res["miou_before_ttda"] == full["miou_before_ttda"]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "ptdiffseg.py", "--eval-only", "--out", str(tmp_path / "x")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=ENV1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--eval-only" in r.stderr and "--ckpt" in r.stderr
    with pytest.raises(UserError, match="--crop-size"):
        P.main(P.Args(demo=True, data_root=str(DATA), crop_size=100, out=str(tmp_path / "c")))
    with pytest.raises(UserError, match="--resume"):
        P.main(P.Args(demo=True, data_root=str(DATA), resume=True, out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()  # refused before anything was written
    with pytest.raises(UserError, match="--scene-prompts-per-image"):
        P.main(P.Args(demo=True, data_root=str(DATA), scene_prompts_per_image=13, out=str(tmp_path / "k")))
    assert not (tmp_path / "k").exists()


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    ensure_synthetic_sample(DATA)
    monkeypatch.setattr(P, "consistency_loss", lambda logits: torch.tensor(float("nan")))
    with pytest.raises(UserError, match="non-finite loss .* at step 0"):
        P.train(demo_args(tmp_path, iters=2))


def test_miou16_13_for_synthia_source_runs_not_for_synthia_targets(tmp_path):
    """SYNTHIA's 16/13-class means belong to SYNTHIA -> Cityscapes, not to a run evaluated on SYNTHIA."""
    ensure_synthetic_sample(DATA)
    out = tmp_path / "run"  # one folder: the second setup reads the 19-class prompt cache of the first
    res = P.evaluate(setup(demo_args(out, src="synthia", tgt="cityscapes")), 0)["cityscapes"]
    assert {"miou16", "miou13"} <= res.keys() and "mIoU16" in res["table"]
    assert "miou16" in json.loads((out / "metrics.json").read_text())["evals"][-1]
    res = P.evaluate(setup(demo_args(out, src="gta5", tgt="synthia")), 0)["synthia"]
    assert "miou16" not in res and "mIoU16" not in res["table"]


def test_synthia_run_ends_with_miou16_13_in_the_line_the_result_and_metrics_json(tmp_path, capsys):
    """A SYNTHIA -> Cityscapes run (2 steps, TTDA 2 steps) reports the papers' SYNTHIA columns at its end: the
    `done` line, main's result (after TTDA, and before it) and metrics.json's "final" record."""
    ensure_synthetic_sample(DATA)
    res = P.main(demo_args(tmp_path, src="synthia", tgt="cityscapes", iters=2, eval_every=2, ckpt_every=2,
                           ttda=True, ttda_steps=2))
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done | ")]
    assert len(done) == 1 and re.search(r"mIoU \d+\.\d\d \| mIoU16 \d+\.\d\d \| mIoU13 \d+\.\d\d", done[0])
    data = json.loads((tmp_path / "metrics.json").read_text())
    evals = {e["prompt"]: e for e in data["evals"]}                       # the last of each (one target)
    for key in ("miou", "miou16", "miou13"):
        assert res[key] == data["final"][key] == evals["TTDA prompt"][key]
        assert res[f"{key}_before_ttda"] == data["final"][f"{key}_before_ttda"] == evals["source prompt"][key]
        assert f"{100 * res[key]:.2f}" in done[0]


# ------------------------------------------------------------------------------------------------------------
# The demo end to end, which is also the learning test
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    ensure_synthetic_sample(DATA)
    out = tmp_path_factory.mktemp("demo")
    t = time.time()
    r = subprocess.run([sys.executable, "ptdiffseg.py", "--demo", "--data-root", str(DATA), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV1)
    return r, out, time.time() - t


def test_demo_end_to_end(demo):
    r, out, wall = demo
    assert r.returncode == 0, r.stderr[-2000:]
    assert wall < 120, f"demo took {wall:.0f} s"
    data = json.loads((out / "metrics.json").read_text())
    assert data["args"]["demo"] and data["args"]["ttda"]
    assert {e["prompt"] for e in data["evals"]} == {"source prompt", "TTDA prompt"}
    assert "cityscapes" in data["ttda"] and data["train_log_ttda_cityscapes"]
    assert list((out / "predictions").glob("*.png")) and list((out / "predictions" / "ttda").glob("*.png"))
    assert re.search(r"eval step \d+ \| cityscapes \| source prompt \| mIoU \d+\.\d\d \| input 128x64",
                     r.stdout)
    assert re.search(r"ttda cityscapes \| source prompt mIoU .* \| TTDA prompt mIoU", r.stdout)
    assert (out / "checkpoints").is_dir() and list((out / "cache").glob("prompt_embeddings-*.safetensors"))
    assert (out / "curves.png").is_file()


def test_demo_says_what_adapts_and_the_target_side_is_active(demo):
    """One line at the start, a summary per part: prompt randomization in every training step, and the scene
    token updated with confident pixels in most TTDA steps."""
    r, _, _ = demo
    assert re.search(r"^adapting: prompt randomization .*scene token s on the unlabeled target", r.stdout, re.M)
    m = re.search(r"^adapted: prompt randomization: .* in (\d+) of (\d+) steps", r.stdout, re.M)
    assert m and m.group(1) == m.group(2) == "50"
    m = re.search(r"^adapted: the scene token s on cityscapes in (\d+) of (\d+) TTDA steps .*fraction ([\d.]+)",
                  r.stdout, re.M)
    assert m and int(m.group(1)) > int(m.group(2)) // 2 and float(m.group(3)) > 0.05, m


def test_demo_learns(demo, tmp_path):
    """Loss falls during the demo's training and its mIoU is clearly above that of the same, untrained model."""
    r, out, _ = demo
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"^step \d+/\d+ \| loss_ce ([\d.]+)", r.stdout, re.M)]
    assert len(losses) >= 3 and losses[-1] < 0.85 * losses[0], losses
    trained = [e["miou"] for e in json.loads((out / "metrics.json").read_text())["evals"]
               if e["prompt"] == "source prompt"][-1]
    P.seed_everything(0)
    run = setup(demo_args(tmp_path))
    untrained = P.evaluate(run, 0)["cityscapes"]["miou"]
    assert trained > 1.5 * untrained and trained > untrained + 0.02, (trained, untrained)
