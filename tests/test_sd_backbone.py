"""SD loading (tiny round trip through save_pretrained / from_pretrained), helpers, hooks and the attention store.

Real SD 1.x / 2.1 shapes are checked on the meta device: the full-size UNets are built and run without allocating
a single weight.
"""
import math

import pytest
import torch

from common.cli import UserError
from common.sd_backbone import (AttentionStore, FeatureCapture, add_noise, build_random_sd, encode_prompts, load_sd,
                                sd_config, tiny_sd_dir, to_dtype, vae_decode, vae_encode)


@pytest.fixture(scope="module")
def tiny():
    return load_sd("tiny")


def test_tiny_round_trip_matches_the_model_built_in_memory(tiny):
    """The folder read back through from_pretrained is the seed-0 model built from config (same outputs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        built = build_random_sd("tiny")
    torch.manual_seed(1)
    z, ctx, x = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a = tiny.unet(z, 10, ctx).sample
        b = built["unet"].eval()(z, 10, ctx).sample
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # reload matches to ~1e-6 (diffusers 0.42)
        torch.testing.assert_close(vae_encode(tiny.vae, x), vae_encode(built["vae"].eval(), x), atol=1e-5, rtol=0)
        ids = tiny.tokenizer(["a car"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(tiny.text_encoder(ids).last_hidden_state,
                                   built["text_encoder"].eval()(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    again = load_sd("tiny", parts=("unet",))
    assert all(torch.equal(p, q) for p, q in zip(tiny.unet.parameters(), again.unet.parameters()))
    assert (tiny_sd_dir() / "unet" / "config.json").exists()


def test_loaded_parts_are_frozen_and_the_scheduler_is_sds(tiny):
    assert not any(p.requires_grad for p in tiny.unet.parameters())
    assert not tiny.vae.training
    s = tiny.scheduler.config
    assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule) == (1000, 0.00085, 0.012,
                                                                                   "scaled_linear")
    assert tiny.scaling_factor == pytest.approx(0.18215)
    assert load_sd("tiny", parts=("vae",)).unet is None


def test_tokenizer_is_byte_level_with_bos_eos_pad(tiny):
    ids = tiny.tokenizer(["ab c"], padding="max_length", max_length=77).input_ids[0]
    # <|startoftext|>, 'a', 'b</w>', 'c</w>', <|endoftext|>, then padding with <|endoftext|>
    assert ids[:5] == [512, ord("a"), 256 + ord("b"), 256 + ord("c"), 513]
    assert len(ids) == 77 and set(ids[5:]) == {513}


def test_encode_prompts_pooled_is_the_final_state_at_the_first_eos(tiny):
    ctx = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a car", ""])
    pooled = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a car", ""], pooled=True)
    assert ctx.shape == (2, 77, 32) and pooled.shape == (2, 32)
    # "a car" = BOS a </w>... : BOS + 5 characters ("a", " " splits words: a</w>, c, a, r</w>) -> EOS at index 5
    ids = tiny.tokenizer(["a car"]).input_ids[0]
    eos = ids.index(513)
    torch.testing.assert_close(pooled[0], ctx[0, eos])
    torch.testing.assert_close(pooled[1], ctx[1, 1])  # "" -> BOS EOS


def test_vae_mean_and_decode_shapes(tiny):
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = vae_encode(tiny.vae, x)
    assert z.shape == (2, 4, 4, 6)
    raw = tiny.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, raw * 0.18215)
    assert vae_decode(tiny.vae, z).shape == (2, 3, 32, 48)
    # frozen-VAE helpers never build a graph, even for an input that requires grad
    assert not vae_encode(tiny.vae, x.clone().requires_grad_(True)).requires_grad
    assert not vae_decode(tiny.vae, z.clone().requires_grad_(True)).requires_grad


def test_to_dtype_casts_like_module_to_without_diffusers_warning(capfd):
    """diffusers 0.42's ModelMixin.to warns on every dtype cast; to_dtype casts the same tensors silently."""
    a, b = load_sd("tiny", ("vae", "unet")), load_sd("tiny", ("vae", "unet"))
    for part in ("vae", "unet"):
        capfd.readouterr()
        to_dtype(getattr(a, part), torch.bfloat16)
        assert "kept in float32" not in "".join(capfd.readouterr())
        getattr(b, part).to(dtype=torch.bfloat16)
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
        assert {v.dtype for v in sa.values() if v.is_floating_point()} == {torch.bfloat16}


def test_add_noise_at_t0_uses_alpha_bar_0(tiny):
    """alpha_bar_0 = 1 - beta_0 = 1 - 0.00085: signal 0.99957, noise 0.02915 (the MADM student pass)."""
    z, eps = torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    out = add_noise(tiny.scheduler, z, eps, 0)
    torch.testing.assert_close(out, torch.full_like(z, math.sqrt(1 - 0.00085) + math.sqrt(0.00085)))
    # scaled_linear: beta_t = (linspace(sqrt(0.00085), sqrt(0.012), 1000)_t)^2, alpha_bar_t = prod_{s<=t}(1 - beta_s)
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    ab = math.prod(1 - b for b in betas)
    out = add_noise(tiny.scheduler, torch.cat([z, z]), torch.cat([eps, -eps]), torch.tensor([0, 999]))
    torch.testing.assert_close(out[1], torch.full_like(z[0], math.sqrt(ab) - math.sqrt(1 - ab)))


def test_feature_capture_tiny_shapes_and_pre_hooks(tiny):
    names = ["up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.3", "up_blocks.0.resnets.1",
             "up_blocks.2.resnets.0.conv2", "up_blocks.1.attentions.0.transformer_blocks.0"]
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with FeatureCapture(tiny.unet, names, pre=names[:2]) as cap:
        tiny.unet(z, 1, ctx)
        shapes = {k: tuple(v.shape) for k, v in cap.features.items()}
    assert shapes == {"up_blocks.1.upsamplers.0": (2, 64, 2, 2), "up_blocks.2.upsamplers.0": (2, 32, 4, 4),
                      "up_blocks.3": (2, 16, 8, 8), "up_blocks.0.resnets.1": (2, 64, 1, 1),
                      "up_blocks.2.resnets.0.conv2": (2, 32, 4, 4),
                      "up_blocks.1.attentions.0.transformer_blocks.0": (2, 4, 64)}
    # hooks are removed on exit
    assert not tiny.unet.get_submodule("up_blocks.3")._forward_hooks
    with pytest.raises(AttributeError, match="has no attribute `9`"):  # a missing name, before any hook
        FeatureCapture(tiny.unet, ["up_blocks.3", "up_blocks.9"])
    assert not tiny.unet.get_submodule("up_blocks.3")._forward_hooks


def test_feature_capture_keeps_autograd(tiny):
    unet = load_sd("tiny", parts=("unet",)).unet.requires_grad_(True)
    with FeatureCapture(unet, ["up_blocks.3"]) as cap:
        unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32))
        cap.features["up_blocks.3"].sum().backward()
    assert unet.up_blocks[0].resnets[0].conv1.weight.grad is not None


@pytest.mark.parametrize("name,ctx_dim", [("sd15", 768), ("sd21", 1024)])
def test_real_sd_feature_shapes_on_the_meta_device(name, ctx_dim):
    """SD 1.x / 2.1 at a 512 crop (64x64 latent): the strides and widths every method relies on."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd_config(name)["unet"])
    names = ["up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.3", "up_blocks.0.resnets.1",
             "up_blocks.2.attentions.1", "up_blocks.3.resnets.2.conv2",
             "up_blocks.1.attentions.0.transformer_blocks.0"]
    with FeatureCapture(unet, names, pre=names[:2]) as cap, torch.device("meta"):
        out = unet(torch.randn(1, 4, 64, 64), torch.tensor([1]), torch.randn(1, 77, ctx_dim)).sample
        shapes = {k: tuple(v.shape) for k, v in cap.features.items()}
    assert out.shape == (1, 4, 64, 64)
    assert shapes == {"up_blocks.1.upsamplers.0": (1, 1280, 16, 16), "up_blocks.2.upsamplers.0": (1, 640, 32, 32),
                      "up_blocks.3": (1, 320, 64, 64), "up_blocks.0.resnets.1": (1, 1280, 8, 8),
                      "up_blocks.2.attentions.1": (1, 640, 32, 32), "up_blocks.3.resnets.2.conv2": (1, 320, 64, 64),
                      "up_blocks.1.attentions.0.transformer_blocks.0": (1, 256, 1280)}
    n_params = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n_params < 870e6  # SD 1.x and 2.1 UNets both have ~860 M parameters


def test_attention_store_same_output_rows_sum_to_one_and_restores(tiny):
    torch.manual_seed(0)
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32)
    with torch.no_grad():
        ref = tiny.unet(z, 1, ctx).sample
        store = AttentionStore(tiny.unet, lambda n: n.startswith(("up_blocks.1", "up_blocks.2")))
        out = tiny.unet(z, 1, ctx).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(store.names) == 6 and all(".attn2." in n for n in store.names)
    maps = store.maps
    assert {tuple(m.shape) for n, m in maps.items() if n.startswith("up_blocks.1")} == {(2, 4, 6)}   # 2x2 queries
    assert {tuple(m.shape) for n, m in maps.items() if n.startswith("up_blocks.2")} == {(2, 16, 6)}  # 4x4 queries
    for m in maps.values():
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
    store.remove()
    assert not any(type(p).__name__ == "_StoreProcessor" for p in tiny.unet.attn_processors.values())


def test_missing_weights_offline_and_bad_folder_are_one_line_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_sd("CompVis/stable-diffusion-v1-4-not-cached", parts=("unet",))
    msg = str(e.value)
    assert msg.startswith("error: --sd-model: weights for 'CompVis/stable-diffusion-v1-4-not-cached'")
    assert "downloaded on first use with internet" in msg and "--sd-model /path/to/folder" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match=r"cannot load 'scheduler' from the folder"):
        load_sd(str(tmp_path), parts=("unet",))
