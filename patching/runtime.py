"""The attention-override hooks: what installs the holder on a model clone and, in each sampling
run, creates the state that state.py defines.

    install                the holder (AttentionPatch) on a clone, the wrappers below, and object
                           patches on the projections (branch.py) and blocks (block_cache.py) the
                           method needs.
    OUTER_SAMPLE wrapper   sampling starts: a SamplingRun is created for this run only and
                           dropped when sampling ends (also on exception or interrupt).
    APPLY_MODEL wrapper    each model call: finds the step from `sigmas` in `sample_sigmas` (the
                           run's Timeline, which also reads start / end percent as noise levels),
                           the batch halves from `cond_or_uncond`, the layout from the latent and
                           the conditioning, and installs a ForwardPass as the attention override
                           of this call only (chaining any override already present); the
                           ForwardPass numbers, classifies and hands each attention call to the
                           method. A method with `step_reuse` (a plan that skips whole steps) may
                           answer the call from the predictions of earlier steps instead
                           (step_reuse.py).

APPLY_MODEL (not DIFFUSION_MODEL) wrappers are used because every architecture runs them;
SD3's model never calls DIFFUSION_MODEL wrappers.

Other attention overrides: the one found in the call's options (core's "Model Attention Backend" and
"Model Sparse Attention", which newer hosts re-install from ON_PREPARE_STATE every step, or another
pack's) is chained below ours, whichever node came first, and runs every call we compute in full. An
override installed above ours inside the forward would hide calls from our numbering, and a CUDA graph
capture would freeze our per-step choices: both make the techniques stand aside, visibly.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch

from . import step_reuse
from .adapters import ADAPTERS, Adapter, Block, Projection, UnsupportedArchitectureError, adapter_for
from .block_cache import block_forward
from .branch import projection_forward
from .cache import block_replacements, chunk_ids
from .call import AttentionCall
from .layout_proof import prove_layout
from .run_scope import run_in_options, sampled_timeline
from .site import CallSite
from .state import (
    ACTIVE,
    COND,
    OTHER,
    OVERRIDE_KEY,
    UNCOND,
    AttentionMethod,
    AttentionPatch,
    ForwardPass,
    SamplingRun,
)

PATCH_KEY = "fastattn"  # key of our holder in transformer_options and of our wrappers
RUN_KEY = "fastattn_run"  # key of the per-run state in a run's transformer_options


def full_attention(call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
    """The host's own attention, unchanged."""
    return call.run_default(), call.flops(), "full"


def _cfg_roles(guider) -> dict[int, int] | None:
    """Which conditioning index is the conditional and which the unconditional prediction.

    `cond_or_uncond` indexes the guider's list of conditionings. ComfyUI's CFG guider (KSampler,
    BasicGuider, CFGGuider) evaluates [positive, negative]; guiders that override predict_noise
    (DualCFGGuider: [negative, middle, positive]; PerpNeg: [positive, negative, empty]) order
    them otherwise, so their chunks get no CFG role (None: CFG sharing stands aside)."""
    if getattr(type(guider), "predict_noise", None) is comfy.samplers.CFGGuider.predict_noise:
        return {0: COND, 1: UNCOND}
    return None


def outer_sample_wrapper(executor, *args, **kwargs):
    """Create the run's state when sampling starts; drop it when sampling ends, however it ends."""
    guider = executor.class_obj
    transformer_options = guider.model_options["transformer_options"]
    patch: AttentionPatch = transformer_options[PATCH_KEY]
    run = SamplingRun(patch, sampled_timeline(executor, args, kwargs), _cfg_roles(guider),
                      block_replacements(transformer_options))
    start = time.perf_counter()
    try:
        with run_in_options(guider, RUN_KEY, run):
            samples = executor(*args, **kwargs)
            if samples.device.type == "cuda":  # the run's queued GPU work counts in its wall time
                torch.cuda.synchronize(samples.device)
            return samples
    finally:
        run.report.wall_seconds = time.perf_counter() - start
        patch.last_report = run.close()
        logging.info("FastAttn: %s", patch.last_report.summary())


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    """Install this call's ForwardPass as the attention override, for this call only."""
    transformer_options = {} if transformer_options is None else transformer_options
    run: SamplingRun | None = transformer_options.get(RUN_KEY)
    if run is None:  # called outside sampling: leave the model as it is
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    adapter = run.patch.adapter
    sigma = float(transformer_options.get("sigmas", t).flatten()[0])
    step = run.timeline.step_of(sigma)
    cond_or_uncond = tuple(transformer_options.get("cond_or_uncond", ()))
    stand_aside = _stand_aside(run, transformer_options, x.shape[0], cond_or_uncond)
    ids = chunk_ids(run.evaluation_of, step, cond_or_uncond, transformer_options, x.device)
    reuses = getattr(run.patch.method, "step_reuse", None) if stand_aside is None and sigma > 0 else None
    # A plan's step reuse (step_reuse.py): this call answered from earlier steps' predictions, if they are kept
    how = reuses(step, run.timeline) if reuses is not None else None
    if how is not None and (out := step_reuse.reused(run, ids, step, x, t, how)) is not None:
        run.report.count_reused(how, step, run.forward_flops.get(x.shape[0], 0))
        return out
    grid, text_len = adapter.image_grid(x.shape), adapter.text_len(c_crossattn, kwargs)
    forward = ForwardPass(
        run,
        step=step,
        cond_or_uncond=cond_or_uncond,
        chunk_ids=ids,
        grid=grid,
        text_len=text_len,
        previous_override=transformer_options.get(OVERRIDE_KEY),
        halves=tuple(OTHER if run.roles is None else run.roles.get(index, OTHER) for index in cond_or_uncond),
        inputs=tuple(x.chunk(len(cond_or_uncond))) if stand_aside is None else (),
        stand_aside=stand_aside,
        context_len=0 if c_crossattn is None else int(c_crossattn.shape[1]),
        layout_proof=None if adapter.layout_proven else run.layout_proof(grid, text_len, lambda: prove_layout(
            _forward_with(executor, (t, c_concat, c_crossattn, control), transformer_options, kwargs, adapter),
            x, grid, adapter.patch_size, text_len)),
    )
    options = {**transformer_options, OVERRIDE_KEY: forward}
    forward.options = options
    token = ACTIVE.set(forward)
    try:
        with adapter.routed(options):
            out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
    finally:
        ACTIVE.reset(token)
    forward.finish()
    run.forward_flops[x.shape[0]] = forward.full_flops
    if reuses is not None:
        step_reuse.store(run, ids, step, x, out, t)
    return out


def _forward_with(executor, args: tuple, transformer_options: dict, kwargs: dict, adapter: Adapter) -> Callable:
    """This model call's forward on another latent, with another attention override (a layout proof)."""

    def forward(latent: torch.Tensor, override: Callable) -> None:
        options = {**transformer_options, OVERRIDE_KEY: override}
        with adapter.routed(options):
            executor(latent, *args[:4], options, **kwargs)

    return forward


def _stand_aside(run: SamplingRun, transformer_options: dict, batch: int, cond_or_uncond: tuple[int, ...]) -> str | None:
    """Why no technique may touch this forward, if one must stand aside: a forward that replaces
    blocks the model itself does not (Skip Layer Guidance skipping layers) numbers its attention
    layers differently, so neither the schedule's layers nor the caches apply to it; and every
    cache and CFG copy is kept per conditioning chunk, so a call whose batch is not made of its
    `cond_or_uncond` chunks (an extension calling the model itself) has nothing to key them by."""
    if run.displaced is not None:
        return run.displaced
    if block_replacements(transformer_options) != run.block_replacements:
        return "a forward with blocks replaced for it alone (e.g. Skip Layer Guidance)"
    if not cond_or_uncond:
        return "a model call without cond_or_uncond (an extension calling the model itself)"
    if batch % len(cond_or_uncond):
        return "a model call whose batch does not split into its cond_or_uncond chunks"
    return None


def install(model, method: AttentionMethod = full_attention):
    """A clone of `model` (a ModelPatcher) whose attention runs through `method`.

    Raises UnsupportedArchitectureError, naming the model class, if no adapter knows it."""
    adapter = adapter_for(model.model.diffusion_model)
    patched = model.clone()
    projections, note = _branch_projections(patched, adapter, method)
    for projection in projections:
        _replace_forward(patched, projection.path, functools.partial(projection_forward, projection))
    for block in _blocks(patched, adapter, method):
        _replace_forward(patched, block.path, functools.partial(block_forward, block))
    patched.model_options["transformer_options"][PATCH_KEY] = AttentionPatch(method, adapter, tuple(projections), note)
    for wrapper_type in (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.APPLY_MODEL):
        patched.remove_wrappers_with_key(wrapper_type, PATCH_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, apply_model_wrapper)
    return patched


def _branch_projections(model, adapter: Adapter, method: AttentionMethod) -> tuple[list[Projection], str]:
    """The projection layers to hook for branch-level sharing, and the report's line on it.

    Fused layers (one weight for the branch and the MLP) are sliced, which needs a plain weight."""
    if not getattr(method, "skip_branch", False):
        return [], ""
    projections = adapter.projections(model.model.diffusion_model) if adapter.projections else []
    fused_quantized = {p.layer for p in projections if p.branch_features is not None
                       and type(model.get_model_object(f"diffusion_model.{p.path}").weight.data) is not torch.Tensor}
    projections = [p for p in projections if p.layer not in fused_quantized]
    if not projections:
        why = adapter.call_level_only or f"no branch map for this {adapter.name} model"
        return [], f"sharing skips attention calls only ({why}): projections still run"
    return projections, "sharing skips whole attention branches (QKV and output projections)"


def _replace_forward(model, path: str, make: Callable[[Callable], Callable]) -> None:
    """Patch the `forward` of the module at `path` (under the diffusion model) on the clone with `make(original)`,
    the original being the host's even where an earlier FastAttn clone already patched it."""
    key = f"diffusion_model.{path}.forward"
    current = model.get_model_object(key)
    model.add_object_patch(key, make(getattr(current, "fastattn_original", current)))


def _blocks(model, adapter: Adapter, method: AttentionMethod) -> list[Block]:
    """The blocks to hook for a method that caches blocks; a model whose blocks the pack does not know
    is refused (block caching would silently do nothing)."""
    if not getattr(method, "caches_blocks", False):
        return []
    blocks = adapter.blocks(model.model.diffusion_model) if adapter.blocks is not None else []
    if not blocks:
        known = ", ".join(known.name for known in ADAPTERS if known.blocks is not None)
        raise UnsupportedArchitectureError(
            f"block caching knows the blocks of these models (their standard variants): {known}; this {adapter.name} "
            "model's blocks are not among them: calibrate without block caching (switch block_cache off)")
    return blocks


def patch_of(model) -> AttentionPatch | None:
    """The holder installed on a patched model, if any."""
    return model.model_options.get("transformer_options", {}).get(PATCH_KEY)
