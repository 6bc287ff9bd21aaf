"""The small test models: they build, sample through the host's path, and make the attention calls
`expected_layers` says (the counts the pack's patching and benchmarks rely on)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import comfy.ldm.hydit.attn_layers
import comfy.ldm.pixart.blocks
import comfy.model_patcher
import pytest
import torch
from harness.models import (
    ARCHITECTURES,
    build_model,
    conditioning,
    empty_latent,
    expected_layers,
    joint_text_tokens,
    sample,
    small_latent,
    token_grid,
)

TEXT_LEN = 7
STEPS = 2
CFG = 3.0
# Models whose attention modules call the attention function without transformer_options (so the
# override never sees them): their self and cross attention module classes.
UNROUTED = {"pixart": (comfy.ldm.pixart.blocks.AttentionKVCompress, comfy.ldm.pixart.blocks.MultiHeadCrossAttention),
            "hunyuan_dit": (comfy.ldm.hydit.attn_layers.Attention, comfy.ldm.hydit.attn_layers.CrossAttention)}


@dataclass
class Runs:
    """What one architecture's test model did when sampled."""

    arch: str
    model: comfy.model_patcher.ModelPatcher
    latent: dict
    first: torch.Tensor  # prompt A, sampled with the counting hooks installed
    again: torch.Tensor  # prompt A, same seed, no hooks
    other: torch.Tensor  # prompt B
    forwards: int  # diffusion-model forwards during `first`
    attention: Counter  # attention calls during `first`, by kind


def _kind(q: torch.Tensor, k: torch.Tensor, skip_reshape: bool, image: int, joint_text: int) -> str:
    """Classify one attention call by its query and key lengths ([B, H, N, D] or [B, N, H*D]); text-only
    calls hold the prompt (or the joint call's text, where the model adds tokens to the prompt)."""
    axis = 2 if skip_reshape else 1
    lengths = (q.shape[axis], k.shape[axis])
    kinds = {(image + joint_text, image + joint_text): "joint", (image, image): "image", (TEXT_LEN, TEXT_LEN): "text",
             (joint_text, joint_text): "text"}
    if lengths[0] == image and lengths[1] != image:
        return "cross"
    return kinds.get(lengths, f"unknown q={lengths[0]} k={lengths[1]}")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def runs(request: pytest.FixtureRequest) -> Runs:
    arch = request.param
    latent = small_latent(arch)
    image_tokens = math.prod(token_grid(arch, latent))
    model = build_model(arch)
    prompt_a, prompt_b, negative = (conditioning(arch, TEXT_LEN, seed) for seed in (1, 2, 3))

    attention: Counter = Counter()
    forwards = 0
    joint_text = TEXT_LEN

    def count_attention(func, *args, **kwargs):
        attention[_kind(args[0], args[1], kwargs.get("skip_reshape", False), image_tokens, joint_text)] += 1
        return func(*args, **kwargs)

    def count_forwards(apply_model, args: dict) -> torch.Tensor:
        nonlocal forwards, joint_text
        forwards += 1
        joint_text = joint_text_tokens(arch, args["c"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    hooked = model.clone()
    hooked.model_options["transformer_options"]["optimized_attention_override"] = count_attention
    hooked.set_model_unet_function_wrapper(count_forwards)
    first = sample(hooked, prompt_a, negative, latent, steps=STEPS, cfg=CFG)
    again = sample(model, prompt_a, negative, latent, steps=STEPS, cfg=CFG)
    other = sample(model, prompt_b, negative, latent, steps=STEPS, cfg=CFG)
    return Runs(arch, model, latent, first, again, other, forwards, attention)


def test_build_model_is_small_float32_and_initialised(runs: Runs) -> None:
    params = list(runs.model.model.diffusion_model.parameters())
    # at most 3.5M, except HunyuanImage's glyph mapper, whose widths the host fixes (1472 -> 2048 -> 2048)
    assert sum(p.numel() for p in params) < (10_000_000 if runs.arch == "hunyuan_image21" else 3_500_000)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)


def test_sampling_gives_finite_latent_of_the_right_shape(runs: Runs) -> None:
    assert runs.first.shape == runs.latent["samples"].shape
    assert torch.isfinite(runs.first).all()
    assert runs.first.abs().max() > 0


def test_same_seed_same_output_and_hooks_change_nothing(runs: Runs) -> None:
    assert torch.equal(runs.first, runs.again)


def test_output_depends_on_the_prompt(runs: Runs) -> None:
    assert not torch.allclose(runs.first, runs.other)


def test_expected_layers_match_the_attention_calls(runs: Runs) -> None:
    expected = expected_layers(runs.arch)
    assert runs.forwards > 0
    if runs.arch in UNROUTED:
        # The host's PixArt and Hunyuan-DiT blocks call optimized_attention without transformer_options,
        # so the override never sees them: count the attention modules of the model instead.
        assert not runs.attention
        modules = list(runs.model.model.diffusion_model.modules())
        self_attention, cross_attention = UNROUTED[runs.arch]
        observed = {"image": sum(type(m) is self_attention for m in modules),
                    "cross": sum(type(m) is cross_attention for m in modules)}
        assert observed == expected
    else:
        assert dict(runs.attention) == {kind: n * runs.forwards for kind, n in expected.items()}


def test_image_models_reject_frames_and_pixart_rejects_tiny_latents() -> None:
    with pytest.raises(ValueError):
        empty_latent("flux", 16, 16, frames=2)
    with pytest.raises(ValueError):
        empty_latent("pixart", 32, 32)
