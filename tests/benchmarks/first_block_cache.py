"""First-block cache, the idea behind TeaCache and WaveSpeed's cache: a baseline for the benchmarks
(written here from the methods' description, not part of the pack).

At each model call the first transformer block runs. Its image-stream residual (output - input) is
set beside the one of the last fully computed call with the same batch layout (which conditionings,
which shape); the relative L1 change is summed over consecutive skipped calls, and while that sum
stays below the threshold the remaining blocks are skipped: their residual from that full call
(last block's output - first block's output) is added to this call's first block output. Otherwise
every block runs, the caches refresh and the sum restarts at 0.

Hooked on a model clone through ComfyUI's own mechanisms, for MMDiT (SD3-class) models: block
replacements (`patches_replace["dit"]`, which the host's MMDiT honours per joint block) and an
OUTER_SAMPLE wrapper that gives each sampling run fresh state in its own copy of the model options,
so nothing outlives the run and a clone of the clone starts clean.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.patcher_extension
import torch

KEY = "first_block_cache"


@dataclass
class _Entry:
    """The caches of one batch layout, from its last fully computed call."""

    first_residual: torch.Tensor  # first block's image output - its input
    rest_residual: torch.Tensor | None = None  # last block's image output - first block's
    accumulated: float = 0.0  # relative changes summed over the skips since that call


@dataclass
class _Run:
    """One sampling run's state: the caches per batch layout and the call in progress."""

    threshold: float
    entries: dict[tuple, _Entry] = field(default_factory=dict)
    current: _Entry | None = None
    first_output: torch.Tensor | None = None  # this call's first block image output
    skipping: bool = False


def first_block_cache(model: comfy.model_patcher.ModelPatcher, threshold: float) -> comfy.model_patcher.ModelPatcher:
    """A clone of an MMDiT `model` that skips all blocks but the first while their input barely moves."""
    patched = model.clone()
    count = len(patched.get_model_object("diffusion_model").joint_blocks)
    for index in range(count):
        patched.set_model_patch_replace(functools.partial(_block, index, count), "dit", "double_block", index)
    patched.model_options["transformer_options"][KEY] = threshold
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, _sample_wrapper)
    return patched


def _sample_wrapper(executor, *args, **kwargs):
    """Fresh state for this sampling run, in a copy of the guider's options that is dropped after it."""
    guider = executor.class_obj
    options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(options)
    transformer_options = guider.model_options["transformer_options"]
    transformer_options[KEY] = _Run(transformer_options[KEY])
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = options


def _block(index: int, count: int, args: dict, extra: dict) -> dict:
    """Joint block `index` of `count`: the first decides, the rest run or stand aside, the last
    adds the cached residual when the call skips."""
    options = args["transformer_options"]
    run: _Run = options[KEY]
    if index == 0:
        out = extra["original_block"](args)
        _decide(run, (tuple(options.get("cond_or_uncond", ())), tuple(args["img"].shape)),
                out["img"] - args["img"])
        run.first_output = out["img"]
        return out
    if run.skipping:
        img = run.first_output + run.current.rest_residual if index == count - 1 else args["img"]
        return {"txt": args["txt"], "img": img}
    out = extra["original_block"](args)
    if index == count - 1:
        run.current.rest_residual = out["img"] - run.first_output
    return out


def _decide(run: _Run, layout: tuple, residual: torch.Tensor) -> None:
    """Skip this call if the first block's residual stayed near the last full call's; else refresh."""
    entry = run.entries.get(layout)
    if entry is not None and entry.rest_residual is not None:
        change = (residual - entry.first_residual).abs().mean() / entry.first_residual.abs().mean()
        entry.accumulated += float(change)
        if entry.accumulated < run.threshold:
            run.current, run.skipping = entry, True
            return
    run.current = run.entries[layout] = _Entry(residual)
    run.skipping = False
