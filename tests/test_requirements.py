"""requirements.txt floors that code paths rely on, checked against the installed packages.

diffusers: `--grad-checkpointing` (ptdiffseg.py) checkpoints a frozen UNet kept in eval mode. Up to 0.31 the
UNet blocks checkpointed only under `self.training and self.gradient_checkpointing`, a silent no-op in eval
mode; 0.32.0 switched every UNet2DConditionModel block to `torch.is_grad_enabled() and
self.gradient_checkpointing` (huggingface/diffusers PR #9878, "Enabling gradient checkpointing in eval()
mode"; checked in the v0.31.0 and v0.32.0 tags of `src/diffusers/models/unets/unet_2d_blocks.py`).
"""
import re
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.version import Version

from common.sd_backbone import sd_config

ROOT = Path(__file__).resolve().parents[1]
EVAL_MODE_CHECKPOINTING = Version("0.32.0")


def requirement_floor(name: str) -> Version:
    """The `>=` floor of `name` in requirements.txt."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(rf"^\s*{re.escape(name)}\s*>=\s*([0-9][^\s,;#]*)", line)
        if m:
            return Version(m.group(1))
    raise AssertionError(f"requirements.txt has no '{name}>=' line")


def test_diffusers_floor_allows_eval_mode_checkpointing_and_is_installed():
    floor = requirement_floor("diffusers")
    why = f"diffusers>={floor} admits releases where eval-mode checkpointing is a no-op"
    assert floor >= EVAL_MODE_CHECKPOINTING, f"{why}; raise the floor to {EVAL_MODE_CHECKPOINTING}"
    assert Version(version("diffusers")) >= floor


def _recomputed_calls(checkpointing: bool) -> dict[str, int]:
    """Forward calls of two UNet sub-modules during backward (recomputation), UNet frozen and in eval mode."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd_config("tiny")["unet"]).eval().requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    # as in ptdiffseg.py: the gradient reaches a trainable context through the frozen UNet
    ctx = torch.randn(1, 3, 32, requires_grad=True)
    watched = {"resnet": unet.down_blocks[1].resnets[0],
               "transformer": unet.down_blocks[0].attentions[0].transformer_blocks[0]}
    calls = dict.fromkeys(watched, 0)
    for key, module in watched.items():
        # a pre-hook: torch's non-reentrant checkpoint stops a recomputation early once the saved tensors it
        # needs exist again, so a module's forward (post-)hook may never fire during backward
        module.register_forward_pre_hook(lambda mod, args, key=key: calls.__setitem__(key, calls[key] + 1))
    out = unet(torch.randn(1, 4, 16, 16), 1, encoder_hidden_states=ctx).sample
    assert calls == dict.fromkeys(watched, 1) and not unet.training
    calls.update(dict.fromkeys(watched, 0))
    out.square().mean().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    return calls


def test_gradient_checkpointing_recomputes_in_eval_mode():
    assert _recomputed_calls(checkpointing=True) == {"resnet": 1, "transformer": 1}
    assert _recomputed_calls(checkpointing=False) == {"resnet": 0, "transformer": 0}  # the control
