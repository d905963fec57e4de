"""Tests of ptdiffseg.py: class-token attention maps, the losses, prompt embeddings and their cache, equivalence of
the optimisations (batched scene prompts, gradient checkpointing), the gradient path through the frozen UNet,
TTDA touching nothing but the scene prompt, resume bit equality, --profile, bad input, and the demo end to end
(which doubles as the learning test).

Everything runs on CPU with the tiny random SD (loaded through from_pretrained) and the synthetic sample.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ptdiffseg as P
from common import runtime
from common.runtime import UserError
from common.sd_backbone import encode_prompts, load_sd
from common.synthetic import ensure_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "synthetic"
NAMES = ("road", "sky", "car", "person", "vegetation")  # a small class set keeps the text-encoder pass short
# One thread per process: on a shared, oversubscribed CPU, OpenMP threads waiting on each other make the tiny
# model's steps tens of times slower than a single thread.
ENV1 = dict(os.environ, OMP_NUM_THREADS="1")


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
    s = P.scene_embeddings(sd.tokenizer, sd.text_encoder)
    fsd = P.FrozenSD(sd.unet, sd.vae, timestep=1, latent_scale=True)
    torch.manual_seed(0)
    model = P.PTDiffSeg(c, s, fsd.channels, gamma_init=1e-4).eval()
    return sd, fsd, model


def demo_args(out, **kw) -> P.Args:
    """The demo's resolved configuration with overrides (TTDA off unless asked)."""
    args = P.resolve_args(P.Args(demo=True, data_root=str(DATA), out=str(out)))
    return dataclasses.replace(args, **{"ttda": False, **kw})


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
    A16 = torch.stack([p for n, p in fsd.store.maps.items() if n.startswith(("down_blocks.1.", "up_blocks.2."))])
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
    # stop-gradient on the mean only: the gradient equals that of sum_k KL(p_k || const)
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
    a = P.draw_scene_prompts(0, 3, 0, 4, 12, 2)
    assert a.shape == (4, 2) and (a[:, 0] != a[:, 1]).all() and a.max() < 12
    assert torch.equal(a, P.draw_scene_prompts(0, 3, 0, 4, 12, 2))
    assert torch.equal(a[2:], P.draw_scene_prompts(0, 3, 2, 2, 12, 2))  # rank 1 of 2 draws its own images
    assert not torch.equal(a, P.draw_scene_prompts(0, 4, 0, 4, 12, 2))


def test_class_embeddings_template_average_and_disk_cache(tiny, tmp_path, monkeypatch):
    sd = tiny[0]
    c, s = P.prompt_embeddings("tiny", NAMES[:2], tmp_path)
    assert c.shape == (2, 32) and s.shape == (len(P.SCENE_PROMPTS), 32)
    # independent reference: each template on its own through the encoder, pooled EOS, plain mean
    one = torch.stack([encode_prompts(sd.tokenizer, sd.text_encoder, [t.format("sky")], pooled=True)[0]
                       for t in P.TEMPLATES]).mean(0)
    torch.testing.assert_close(c[1], one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(c[0], c[1])
    # the cache is keyed by (model id, class names) and a hit never loads the text encoder
    files = list(tmp_path.glob("prompt_embeddings-*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(P, "load_sd", lambda *a, **k: pytest.fail("text encoder loaded on a cache hit"))
    c2, s2 = P.prompt_embeddings("tiny", NAMES[:2], tmp_path)
    assert torch.equal(c, c2) and torch.equal(s, s2)
    assert P.embedding_cache_path(tmp_path, "tiny", NAMES[:3]) != files[0]
    assert P.embedding_cache_path(tmp_path, "other-model", NAMES[:2]) != files[0]


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision storage of the frozen UNet needs CUDA")
def test_frozen_parts_half_precision_on_cuda(tmp_path):
    ensure_synthetic_sample(DATA)
    run = P.setup(demo_args(tmp_path, device="cuda"))
    assert run.sd.unet.dtype in (torch.float16, torch.bfloat16) and run.sd.vae.dtype == run.sd.unet.dtype
    assert all(p.dtype == torch.float32 for p in run.model.parameters())


# ------------------------------------------------------------------------------------------------------------
# TTDA, resume, eval-only, profile, bad input
# ------------------------------------------------------------------------------------------------------------
def _snapshot(run):
    t = {f"model.{k}": v.clone() for k, v in run.model.state_dict().items()}
    t.update({f"buf.{k}": v.clone() for k, v in run.model.named_buffers()})
    t.update({f"unet.{k}": v.clone() for k, v in run.sd.unet.state_dict().items()})
    t.update({f"vae.{k}": v.clone() for k, v in run.sd.vae.state_dict().items()})
    return t


def test_ttda_changes_only_the_scene_prompt(tmp_path):
    ensure_synthetic_sample(DATA)
    runtime.seed_everything(0)
    run = P.setup(demo_args(tmp_path, ttda=True, ttda_steps=2, ttda_threshold=0.0, ttda_lr=1e-2))
    run.model.train()  # TTDA must switch to eval mode itself (BN statistics untouched) and restore the mode
    before = _snapshot(run)
    s = P.ttda(run, "cityscapes")
    after = _snapshot(run)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"TTDA modified {changed[:5]}"
    assert s.shape == (1, run.sd.d) and not torch.equal(s, run.model.scene_pool[:1])
    assert run.model.training and all(p.requires_grad for p in run.model.parameters())


def test_resume_is_bit_identical_and_eval_only_ttda(tmp_path):
    """4 steps with a checkpoint every 2; drop the step-4 checkpoint; --resume from step 2 must rebuild it exactly.
    Then --eval-only --ckpt --ttda on that checkpoint reports mIoU before and after."""
    ensure_synthetic_sample(DATA)
    args = demo_args(tmp_path / "run", iters=4, ckpt_every=2, keep_ckpts=0, eval_every=1000, log_every=2)
    runtime.seed_everything(args.seed)
    P.train(P.setup(args))
    ck = tmp_path / "run" / "checkpoints"
    w4 = load_file(str(ck / "step_0000004" / "weights.safetensors"))
    w2 = load_file(str(ck / "step_0000002" / "weights.safetensors"))
    assert any(not torch.equal(w2[k], w4[k]) for k in w4)
    os.rename(ck / "step_0000004", tmp_path / "uninterrupted")
    args_r = dataclasses.replace(args, resume=True)
    runtime.seed_everything(args.seed + 123)  # the resumed run must restore every RNG state from the checkpoint
    P.train(P.setup(args_r))
    w4r = load_file(str(ck / "step_0000004" / "weights.safetensors"))
    assert w4.keys() == w4r.keys()
    assert all(torch.equal(w4[k], w4r[k]) for k in w4), "resumed weights differ from the uninterrupted run"

    out = P.main(P.Args(demo=True, data_root=str(DATA), eval_only=True, ckpt=str(tmp_path / "uninterrupted"),
                        ttda_steps=2, out=str(tmp_path / "eval")))
    rec = out["ttda"]["cityscapes"]
    assert 0.0 <= rec["miou_before"] <= 1.0 and 0.0 <= rec["miou_after"] <= 1.0 and out["step"] == 4
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["ttda"]["cityscapes"]["miou_before"] == pytest.approx(rec["miou_before"])
    assert {e["prompt"] for e in saved["evals"]} == {"source prompt", "TTDA prompt"}
    assert (tmp_path / "eval" / "ttda" / "cityscapes_scene.safetensors").is_file()


def test_profile_runs_without_data_and_writes_nothing(tmp_path):
    out = tmp_path / "prof"
    res = P.main(P.Args(profile=1, sd_model="tiny", crop_size=64, data_root=str(tmp_path / "no-data"),
                        out=str(out)))
    assert res["flops_per_iter"] > 0 and res["sec_per_iter"] > 0 and res["unet_batch"] == 4
    assert not out.exists()


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


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    ensure_synthetic_sample(DATA)
    monkeypatch.setattr(P, "consistency_loss", lambda logits: torch.tensor(float("nan")))
    with pytest.raises(UserError, match="non-finite loss .* at step 0"):
        P.train(P.setup(demo_args(tmp_path, iters=2)))


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
    assert "cityscapes" in data["ttda"]
    assert list((out / "predictions").glob("*.png")) and list((out / "predictions" / "ttda").glob("*.png"))
    assert re.search(r"eval step \d+ \| cityscapes \| source prompt \| mIoU \d+\.\d\d \| input 128x64", r.stdout)
    assert re.search(r"ttda cityscapes \| source prompt mIoU .* \| TTDA prompt mIoU", r.stdout)
    assert (out / "checkpoints").is_dir() and list((out / "cache").glob("prompt_embeddings-*.safetensors"))


def test_demo_learns(demo, tmp_path):
    """Loss falls during the demo's training and its mIoU is clearly above that of the same, untrained model."""
    r, out, _ = demo
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"^step \d+/\d+ \| loss_ce ([\d.]+)", r.stdout, re.M)]
    assert len(losses) >= 3 and losses[-1] < 0.85 * losses[0], losses
    trained = [e["miou"] for e in json.loads((out / "metrics.json").read_text())["evals"]
               if e["prompt"] == "source prompt"][-1]
    runtime.seed_everything(0)
    run = P.setup(demo_args(tmp_path))
    untrained = P.evaluate(run, "cityscapes", 0, run.model.scene_pool[:1])["miou"]
    assert trained > 1.5 * untrained and trained > untrained + 0.02, (trained, untrained)
