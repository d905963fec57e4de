"""Stable Diffusion parts for the four methods: loading, the tiny / random architectures, VAE and text
helpers, feature capture by forward hooks and cross-attention probability capture by an attention processor.

Everything is loaded the way the diffusers examples do it (`from_pretrained(id_or_folder, subfolder="unet")`),
and the miniatures go through that very same code: `mini` (pretrained on the synthetic world by
`python -m common.mini_sd`, shipped in `common/mini-sd/`) and `tiny` (random weights: built from config, written
with `save_pretrained` into a cache folder once, and read back with `from_pretrained`). Nothing
here is a method's contribution; the method files decide what is trained, frozen, cast or hooked.

Model names accepted by `load_sd`:
    a hub id                      e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5` (downloaded on first use)
    a local folder                with unet/ vae/ text_encoder/ tokenizer/ scheduler/ subfolders
    `mini`                        miniature SD pretrained on the synthetic world (common/mini-sd/; the demos)
    `tiny`                        miniature random SD (seed 0) with SD's block layout: every hook name works
    `random-sd15`, `random-sd21`  the real SD 1.x / 2.1 architectures, random weights (profiling, no download)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from common.cli import UserError

ALL_PARTS = ("unet", "vae", "text_encoder", "tokenizer")

# ------------------------------------------------------------------------------------------------------------
# Architectures (configs only: no weights)
# ------------------------------------------------------------------------------------------------------------
_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# The SD scheduler every model here is trained with: 1000 steps, scaled-linear betas 0.00085 -> 0.012
# (CompVis `v1-inference.yaml`; diffusers' SD folders). SD 2.1 (768) predicts v instead of epsilon.
_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon", steps_offset=1, clip_sample=False)


def sd_config(name: str) -> dict:
    """Configs of the UNet, VAE, text encoder and scheduler for `tiny`, `sd15` (SD 1.x) or `sd21`
    (SD 2.1, 768).

    Args:
        name: "tiny" | "sd15" | "sd21".
    Returns:
        {"unet": kwargs for UNet2DConditionModel, "vae": kwargs for AutoencoderKL, "text_encoder": kwargs for
         CLIPTextConfig, "scheduler": kwargs for DDPMScheduler}. Build on the meta device to inspect shapes
        without allocating weights.
    """
    if name == "tiny":
        # Our miniature [our choice]: SD's block layout at 1/20 of the width, so hook names,
        # strides and the 3-ResNet up blocks are those of the real model.
        unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 64, 64),
                    layers_per_block=2, down_block_types=_DOWN, up_block_types=_UP, cross_attention_dim=32,
                    attention_head_dim=4, norm_num_groups=8)
        vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                   up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(16, 32, 64, 64),
                   layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                   scaling_factor=0.18215)
        text = dict(vocab_size=514, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=77, projection_dim=32,
                    bos_token_id=512, eos_token_id=513, pad_token_id=513)
        return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": dict(_SCHEDULER)}
    if name not in ("sd15", "sd21"):
        raise ValueError(f"unknown SD architecture '{name}' (tiny, sd15, sd21)")
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
               scaling_factor=0.18215)
    if name == "sd15":  # CompVis/stable-diffusion-v1-4 and v1-5 unet/config.json, CLIP ViT-L/14 text tower
        unet = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                    layers_per_block=2, down_block_types=_DOWN, up_block_types=_UP, cross_attention_dim=768,
                    attention_head_dim=8, norm_num_groups=32)
        text = dict(vocab_size=49408, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=77, projection_dim=768,
                    hidden_act="quick_gelu", bos_token_id=512, eos_token_id=513, pad_token_id=513)
        return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": dict(_SCHEDULER)}
    # SD 2.1 (768-v): linear projections, upcast attention, per-block head dims, OpenCLIP-H text tower
    # (23 of 24 layers, as shipped in the diffusers folder), v-prediction.
    unet = dict(sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2, down_block_types=_DOWN, up_block_types=_UP, cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
                norm_num_groups=32)
    text = dict(vocab_size=49408, hidden_size=1024, num_hidden_layers=23, num_attention_heads=16,
                intermediate_size=4096, max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
                bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return {"unet": unet, "vae": vae, "text_encoder": text,
            "scheduler": dict(_SCHEDULER, prediction_type="v_prediction")}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (the byte-level BPE alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: str | Path) -> None:
    """Write CLIPTokenizer files for a byte-level vocabulary of 514 ids, built locally (no download).

    ids 0-255: the 256 byte symbols; 256-511: the same with `</w>` (end of word); 512 `<|startoftext|>`;
    513 `<|endoftext|>` (also the pad token); max length 77. The merges file holds only its version line, so
    every word is tokenized into its characters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = _bytes_to_unicode()
    symbols = [table[b] for b in range(256)]  # id = byte value
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "do_lower_case": True}))


def build_random_sd(name: str, parts: Sequence[str] = ALL_PARTS, device: str | torch.device = "cpu") -> dict:
    """Randomly initialised SD parts from `sd_config(name)`: {part: module} (scheduler always included).

    The tokenizer is the tiny byte-level one for every architecture (ids < 514 are valid in every vocabulary).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd_config(name)
    out: dict[str, Any] = {"scheduler": DDPMScheduler(**cfg["scheduler"])}
    with torch.device(device):
        if "unet" in parts:
            out["unet"] = UNet2DConditionModel(**cfg["unet"])
        if "vae" in parts:
            out["vae"] = AutoencoderKL(**cfg["vae"])
        if "text_encoder" in parts:
            out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    if "tokenizer" in parts:
        import tempfile
        from transformers import CLIPTokenizer
        with tempfile.TemporaryDirectory() as d:
            write_tiny_tokenizer(d)
            out["tokenizer"] = CLIPTokenizer.from_pretrained(d)
    return out


@contextlib.contextmanager
def _no_progress_bars():
    """Silence diffusers/transformers progress bars (a tiny model loads in a blink; the bars are only
    noise)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def cache_root() -> Path:
    """Where generated artefacts (the tiny SD) live: `$DIFFSEG_CACHE`, else `~/.cache/diffseg`."""
    return Path(os.environ.get("DIFFSEG_CACHE", Path.home() / ".cache" / "diffseg"))


TINY_VERSION = "tiny-sd-v2"  # bump when the tiny architecture changes, so stale caches are not reused


def tiny_sd_dir() -> Path:
    """The tiny SD folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), written once with
    `save_pretrained`.

    Built with seed 0 inside a forked RNG, so it is the same on every machine and does not disturb the
    caller's random state. Written into a temporary folder and renamed, so concurrent first calls (parallel
    tests) are safe.
    """
    final = cache_root() / TINY_VERSION
    if (final / "model_index.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TINY_VERSION}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.random.fork_rng(devices=[]), _no_progress_bars():
        torch.manual_seed(0)
        parts = build_random_sd("tiny")
        for part in ("unet", "vae", "text_encoder", "scheduler"):
            parts[part].save_pretrained(tmp / part)
        parts["tokenizer"].save_pretrained(tmp / "tokenizer")
    # model_index.json last: its presence marks a complete folder.
    (tmp / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "tiny": True}))
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race: use its folder
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------
@dataclass
class SD:
    """Loaded Stable Diffusion parts; parts that were not asked for are None.

    Attributes:
        unet: UNet2DConditionModel (epsilon- or v-prediction, see `scheduler.config.prediction_type`).
        vae: AutoencoderKL; latents are `posterior * vae.config.scaling_factor`.
        text_encoder: CLIPTextModel; `last_hidden_state` (N, 77, d) is the cross-attention context.
        tokenizer: CLIPTokenizer (77 tokens).
        scheduler: DDPMScheduler with the model's training schedule.
        model_id: what `--sd-model` said.
    """
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    model_id: str

    @property
    def scaling_factor(self) -> float:
        """VAE latent scale (0.18215 for SD 1.x and 2.x)."""
        return float(self.vae.config.scaling_factor) if self.vae is not None else 0.18215


def mini_sd_dir() -> Path:
    """The shipped `mini` folder (common/mini-sd/), written by `python -m common.mini_sd`."""
    folder = Path(__file__).resolve().parent / "mini-sd"
    if not (folder / "model_index.json").exists():
        raise UserError(f"error: --sd-model mini: the pretrained folder {folder} is missing or incomplete. "
                        "Expected the repository's common/mini-sd/ (restore it with git, or write a new one "
                        "with `python -m common.mini_sd --out common/mini-sd`).")
    return folder


def _missing_weights(model: str, part: str, err: Exception) -> UserError:
    if Path(model).is_dir():
        return UserError(f"error: --sd-model: cannot load '{part}' from the folder '{model}' "
                         f"({type(err).__name__}). Expected {model}/{part}/ as written by "
                         "diffusers/transformers save_pretrained (unet/ vae/ text_encoder/ tokenizer/ "
                         "scheduler/).")
    return UserError(f"error: --sd-model: weights for '{model}' ({part}) are not in the local Hugging Face "
                     "cache and the hub cannot be reached. They are downloaded on first use with internet; "
                     "offline, pass --sd-model /path/to/folder holding unet/ vae/ text_encoder/ tokenizer/ "
                     f"scheduler/ (e.g. from `huggingface-cli download {model}` on a connected machine), or "
                     "--sd-model tiny for a random miniature.")


def load_sd(model: str, parts: Sequence[str] = ALL_PARTS, device: str | torch.device = "cpu") -> SD:
    """Load SD parts with `from_pretrained(model, subfolder=part)`, or build the random architectures.

    Args:
        model: hub id, local folder, "mini", "tiny", "random-sd15" or "random-sd21".
        parts: any of "unet", "vae", "text_encoder", "tokenizer" (the scheduler is always loaded).
        device: where the weights go.
    Returns:
        an `SD` with fp32 weights, every module in eval mode with `requires_grad_(False)`: the method
        unfreezes and casts what it trains.
    Raises:
        UserError: weights not found (offline, wrong id or incomplete folder), with the id and how to fix it.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    bad = [p for p in parts if p not in ALL_PARTS]
    if bad:
        raise ValueError(f"unknown SD part(s) {bad}; choose from {ALL_PARTS}")
    if model in ("random-sd15", "random-sd21"):
        loaded = build_random_sd("sd15" if model == "random-sd15" else "sd21", parts, device)
    else:
        folder = str(tiny_sd_dir()) if model == "tiny" else str(mini_sd_dir()) if model == "mini" else model
        # low_cpu_mem_usage=False is what diffusers falls back to without `accelerate` (not a dependency);
        # saying it explicitly only silences the warning.
        loaders = {"unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet",
                                                                         low_cpu_mem_usage=False),
                   "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae",
                                                                low_cpu_mem_usage=False),
                   "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                   "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")}
        loaded = {}
        quiet = _no_progress_bars() if model in ("tiny", "mini") else contextlib.nullcontext()
        with quiet:
            for part in ["scheduler", *parts]:
                try:
                    # Real SD 1.x folders hold a PNDM config in scheduler/: read it into a DDPMScheduler, the
                    # class whose add_noise/step we use.
                    loaded[part] = (DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
                                    if part == "scheduler" else loaders[part]())
                except (OSError, ValueError, EnvironmentError) as e:
                    raise _missing_weights(model, part, e) from None
    for part in ("unet", "vae", "text_encoder"):
        m = loaded.get(part)
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return SD(loaded.get("unet"), loaded.get("vae"), loaded.get("text_encoder"), loaded.get("tokenizer"),
              loaded["scheduler"], model)


# ------------------------------------------------------------------------------------------------------------
# VAE, text and noise helpers
# ------------------------------------------------------------------------------------------------------------
def to_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype=dtype)` for the frozen SD parts, without diffusers' warning: `ModelMixin.to` (0.42)
    warns "modules that should be kept in float32: []" on every dtype cast, even when, as for SD's VAE and UNet,
    no module must stay in fp32. `nn.Module.to` casts the floating-point tensors exactly the same way."""
    return nn.Module.to(module, dtype=dtype)


@torch.no_grad()
def vae_encode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image -> scaled SD latent: the posterior mean (= mode of the diagonal Gaussian), no sampling.

    Args:
        vae: AutoencoderKL (frozen).
        x: (B, 3, H, W) in [-1, 1], H and W multiples of 8; cast to the VAE's dtype.
    Returns:
        (B, 4, H/8, W/8) latent × `scaling_factor` (0.18215), in the VAE's dtype.
    """
    return vae.encode(x.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Scaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1], NOT clipped (VAE dtype)."""
    return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str],
                   pooled: bool = False) -> torch.Tensor:
    """Run the text encoder on prompts padded/truncated to `tokenizer.model_max_length` (77).

    Returns:
        pooled=False: `last_hidden_state` (N, 77, d), the cross-attention context SD was trained with;
        pooled=True: `pooler_output` (N, d), the final-LayerNorm hidden state at the first end-of-text token.
        On the text encoder's device and dtype.
    """
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
    out = text_encoder(ids)
    return out.pooler_output if pooled else out.last_hidden_state


def add_noise(scheduler: Any, z: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(z_t | z_0): z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps
    (`scheduler.add_noise`).

    Args:
        z, eps: (B, C, h, w); t: an int for the whole batch or (B,) int64.
    """
    if not torch.is_tensor(t):
        t = torch.full((z.shape[0],), int(t), dtype=torch.long)
    return scheduler.add_noise(z, eps.to(z.dtype), t.to(z.device))


# ------------------------------------------------------------------------------------------------------------
# Feature capture by forward hooks
# ------------------------------------------------------------------------------------------------------------
def _first_tensor(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot capture a {type(out).__name__}")


class FeatureCapture(contextlib.AbstractContextManager):
    """Capture outputs (or inputs) of named submodules during a forward pass.

    `with FeatureCapture(unet, ["up_blocks.3", "up_blocks.1.upsamplers.0"], pre=["up_blocks.1.upsamplers.0"])
    as cap: unet(...)` then `cap.features["up_blocks.3"]` is that block's output tensor (the first element of
    a tuple output) and `cap.features["up_blocks.1.upsamplers.0"]` the upsampler's *input*. The captured
    tensors are the graph's own (autograd flows through them); each forward overwrites them.
    """

    def __init__(self, root: nn.Module, names: Iterable[str], pre: Iterable[str] = ()):
        self.root, self.names, self.pre = root, list(names), set(pre)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        modules = [root.get_submodule(name) for name in self.names]  # AttributeError naming a missing part
        for name, module in zip(self.names, modules):                 # (before any hook is installed)
            if name in self.pre:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.features[name] = _first_tensor(out)
        return hook

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self.features[name] = _first_tensor(args)
        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# ------------------------------------------------------------------------------------------------------------
# Cross-attention probabilities through an attention processor
# ------------------------------------------------------------------------------------------------------------
class _StoreProcessor:
    """Attention with explicit probabilities P = softmax(Q K^T / sqrt(d_head)); output = P V as usual.

    Same maths as diffusers' `AttnProcessor` (the non-fused path), so the layer's output equals the default
    SDPA processor's up to float rounding; `mean_heads(P)` (B, N_q, N_k) is kept in the store under `name`.
    """

    def __init__(self, store: "AttentionStore", name: str):
        self.store, self.name = store, name

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)           # (B, N_q, C)
        B, N_q, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], B)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))  # (B*h, N, d_head)
        probs = attn.get_attention_scores(query, key, attention_mask)                 # (B*h, N_q, N_k)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))                         # (B, N_q, C)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self.store.maps[self.name] = probs.view(B, attn.heads, N_q, -1).mean(1)       # (B, N_q, N_k)
        return out


class AttentionStore:
    """Install probability-storing processors on selected cross-attention layers of a UNet.

    Args:
        unet: a diffusers UNet2DConditionModel.
        select: called with each processor name of `unet.attn_processors` whose layer is a cross-attention
            (`...attn2.processor`); True installs the storing processor there. Every other layer keeps its
            current (SDPA) processor.
    Attributes:
        maps: {processor name: (B, N_q, N_k) head-averaged attention probabilities of the last forward}. Rows
            sum to 1 over the N_k context tokens. Differentiable.
    """

    def __init__(self, unet: nn.Module, select: Callable[[str], bool]):
        self.unet = unet
        self.maps: dict[str, torch.Tensor] = {}
        self._previous = dict(unet.attn_processors)
        procs = {name: (_StoreProcessor(self, name) if ".attn2." in name and select(name) else proc)
                 for name, proc in self._previous.items()}
        self.names = [n for n, p in procs.items() if isinstance(p, _StoreProcessor)]
        unet.set_attn_processor(procs)

    def clear(self) -> None:
        self.maps = {}

    def remove(self) -> None:
        """Restore the processors that were installed before."""
        self.unet.set_attn_processor(self._previous)


__all__ = ["SD", "load_sd", "sd_config", "build_random_sd", "tiny_sd_dir", "mini_sd_dir",
           "write_tiny_tokenizer",
           "vae_encode", "vae_decode", "encode_prompts", "add_noise",
           "FeatureCapture", "AttentionStore", "cache_root"]
