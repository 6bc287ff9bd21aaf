"""The attention-override runtime: one holder on the model clone, one state per sampling run.

    OUTER_SAMPLE wrapper   sampling starts: a SamplingRun is created for this run only and
                           dropped when sampling ends (also on exception or interrupt).
    APPLY_MODEL wrapper    each model call: finds the step from `sigmas` in `sample_sigmas` (the
                           run's Timeline, which also reads start / end percent as noise levels),
                           the batch halves from `cond_or_uncond`, the layout from the latent and
                           the conditioning, and installs a ForwardPass as the attention override
                           of this call only (chaining any override already present).
                           A method with `step_reuse` (a plan that skips whole steps) may answer
                           the call from the predictions of earlier steps instead (step_reuse.py).
    ForwardPass            each attention call: numbers the layer, classifies it, and hands it
                           to the patch's method (full attention, a window, a cached output...);
                           for the mapped projection layers of a self-attention branch, says what
                           they do in this call (branch-level sharing, see branch.py).

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
import math
import sys
import time
from collections.abc import Callable
from typing import Protocol

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch
from comfy_execution.utils import get_executing_context

from ..kernels import TokenLayout
from . import step_reuse
from .adapters import Adapter, Block, Projection, UnsupportedArchitectureError, adapter_for
from .block_cache import BlockFacts, block_forward
from .branch import ACTIVE, BranchPlan, projection_forward
from .cache import block_replacements, chunk_ids
from .call import AttentionCall
from .layout_proof import LayoutProof, prove_layout
from .report import CallSite, LayerRecord, RunReport
from .run_scope import run_in_options, sampled_timeline
from .timeline import Timeline

PATCH_KEY = "fastattn"  # key of our holder in transformer_options and of our wrappers
RUN_KEY = "fastattn_run"  # key of the per-run state in a run's transformer_options
OVERRIDE_KEY = "optimized_attention_override"
CAPTURED = ("a CUDA graph capture ran the model: FastAttn's per-step choices cannot be recorded in a graph, so "
            "the run from then on uses the host's attention")
DISPLACED = ("another attention override was installed above FastAttn's inside the model's forward: FastAttn "
             "cannot number the attention calls it handles, so that forward uses the host's attention")


class AttentionMethod(Protocol):
    """Computes one attention call; returns the output, the attention FLOPs it computed and
    the name of the technique it used (the run's report tallies FLOPs per technique)."""

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]: ...


def full_attention(call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
    """The host's own attention, unchanged."""
    return call.run_default(), call.flops(), "full"


class AttentionPatch:
    """The holder stored on a patched model clone: which method computes attention, and the
    report of the last run. Carries no per-run state; ModelPatcher.clone() may copy it."""

    def __init__(self, method: AttentionMethod, adapter: Adapter, projections: tuple[Projection, ...] = (),
                 branch_note: str = "") -> None:
        self.method = method
        self.adapter = adapter
        self.outputs: dict[int, tuple[str, ...]] = {}  # layer -> its branch's output projections (mapped layers)
        for projection in projections:
            paths = self.outputs.setdefault(projection.layer, ())
            self.outputs[projection.layer] = paths + ((projection.path,) if projection.role == "out" else ())
        self.branch_note = branch_note  # how sharing acts on this model, for the report
        self.last_report: RunReport | None = None


class SamplingRun:
    """State of one sampling run: the schedule, caches the methods keep, and the report."""

    def __init__(self, patch: AttentionPatch, timeline: Timeline, roles: dict[int, int] | None = None,
                 block_replacements: frozenset = frozenset()) -> None:
        self.patch = patch
        self.timeline = timeline
        self.roles = roles  # conditioning index -> COND / UNCOND, None when the guider is not ComfyUI's CFG
        self.block_replacements = block_replacements  # the model's own patches_replace keys
        self.evaluations: dict[tuple, int] = {}  # (step, chunk) -> model evaluations seen so far
        self.layout_proofs: dict[tuple, LayoutProof] = {}  # (grid, text tokens) -> a generic model's proven order
        self.forward_flops: dict[int, int] = {}  # batch size -> full attention FLOPs of one forward (step reuse's saving)
        self.cache: dict = {}
        self.blocks: dict[str, BlockFacts] = {}  # block path -> what it did when it last ran (block caching)
        self.displaced: str | None = None  # why the techniques stand aside for the rest of the run, if they must
        self.report = RunReport(patch.adapter.name, timeline.steps, branch_note=patch.branch_note,
                                layout_derived=not patch.adapter.layout_proven)

    def layout_proof(self, grid: tuple[int, ...], text_len: int, prove: Callable[[], LayoutProof]) -> LayoutProof:
        """A generic model's token order at this grid and text length, proven once per run, and only
        for a method that may window (the others never need it)."""
        key = (grid, text_len)
        if key not in self.layout_proofs:
            if not getattr(self.patch.method, "windows", False):
                self.layout_proofs[key] = LayoutProof(None, reason="this method does not window")
            else:
                proof = self.layout_proofs[key] = prove()
                found = (f"{proof.kind} calls, text {'before' if proof.text_first else 'after'} the image" if proof.kind
                         else f"not proven: {proof.reason}")
                logging.info("FastAttn: %s, grid %s: token order %s", self.patch.adapter.name, grid, found)
        return self.layout_proofs[key]

    def evaluation_of(self, step: int, chunk: tuple) -> int:
        """How many times this chunk was already evaluated in this step: 0 for the first model call,
        1 for a second-order sampler's second call (or an extension's extra forward)..."""
        count = self.evaluations.get((step, chunk), 0)
        self.evaluations[(step, chunk)] = count + 1
        return count

    def snapshot(self) -> tuple[dict, dict]:
        """The caches and evaluation counts as they are now: calibration runs several trial
        forwards of one step, each from the same state (`restore`)."""
        return dict(self.cache), dict(self.evaluations)

    def restore(self, state: tuple[dict, dict]) -> None:
        cache, evaluations = state
        self.cache.clear()
        self.cache.update(cache)
        self.evaluations.clear()
        self.evaluations.update(evaluations)

    def stood_aside(self, reason: str) -> None:
        """A technique set for this call could not apply to it (so the call ran as the host computes
        it, or without that technique): counted in the report, logged once per run and reason."""
        if reason not in self.report.stood_aside:
            logging.info("FastAttn: a technique stood aside: %s", reason)
        self.report.stood_aside[reason] = self.report.stood_aside.get(reason, 0) + 1

    def warn(self, text: str, node_ids: tuple[str, ...] = ()) -> None:
        """Something the user should know about this run: logged, kept in the report (the Attention
        Report shows it) and shown on the node now executing (the sampler) and on `node_ids`."""
        if text in self.report.warnings:
            return
        logging.warning("FastAttn: %s", text)
        self.report.warnings.append(text)
        current = executing_node()
        show_on_nodes(text, ((current,) if current is not None else ()) + node_ids)

    def close(self) -> RunReport:
        """End of the run: let the method conclude (e.g. log what it skipped), drop the caches."""
        finish = getattr(self.patch.method, "finish_run", None)
        if finish is not None:
            finish(self)
        if self.report.forwards and not self.report.layers:
            self.warn(f"no attention call of this {self.patch.adapter.name} model reached FastAttn (its attention "
                      "bypasses ComfyUI's attention override), so nothing was compressed")
        self.cache.clear()
        self.evaluations.clear()
        return self.report


def capturing_cuda_graph() -> bool:
    """Whether this call runs inside a CUDA graph capture (whose replays skip Python)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def executing_node() -> str | None:
    """The id of the workflow node now executing (None outside a queued prompt)."""
    context = get_executing_context()
    return None if context is None else context.node_id


def show_on_nodes(text: str, node_ids: tuple[str, ...]) -> None:
    """Show `text` on these nodes of the user's graph, as ComfyUI's progress text under a node;
    does nothing without a running server (scripts, in-process tests)."""
    server = getattr(sys.modules.get("server"), "PromptServer", None)
    instance = getattr(server, "instance", None)
    if instance is None:
        return
    for node_id in dict.fromkeys(node_ids):
        instance.send_progress_text(f"FastAttn: {text}", node_id)


class ForwardPass:
    """The attention override for one model call: numbers and classifies each attention call."""

    def __init__(self, run: SamplingRun, step: int, cond_or_uncond: tuple[int, ...], chunk_ids: tuple,
                 grid: tuple[int, ...], text_len: int, previous_override: Callable | None,
                 halves: tuple[int, ...] = (), inputs: tuple[torch.Tensor, ...] = (),
                 stand_aside: str | None = None, context_len: int | None = None,
                 layout_proof: LayoutProof | None = None) -> None:
        self.run = run
        self.step = step
        self.cond_or_uncond = cond_or_uncond
        self.chunk_ids = chunk_ids
        self.halves = halves
        self.inputs = inputs
        self.stand_aside = stand_aside
        self.grid = grid
        self.text_len = text_len
        self.context_len = text_len if context_len is None else context_len  # the prompt as the model got it
        self.layout_proof = layout_proof  # a generic model's proven token order (None: the adapter knows it)
        self.previous_override = previous_override
        self.options: dict = {}  # the transformer options this pass was installed in
        self.layers = 0
        self.full_flops = 0  # attention FLOPs of this forward's calls, in full
        self.plans: dict[int, BranchPlan | None] = {}  # mapped layer -> what its projections do in this call
        self._planned_kinds: dict[int, str] = {}

    def _check_displaced(self, call_options: dict | None = None) -> None:
        """Stand aside from here on if a CUDA graph is being captured (for the rest of the run: replays
        skip this Python, so later calls could not be numbered) or another override sits above this one."""
        if capturing_cuda_graph():
            self.run.displaced = self.run.displaced or CAPTURED
        above = [options.get(OVERRIDE_KEY) for options in (self.options, call_options or {}) if OVERRIDE_KEY in options]
        reason = self.run.displaced or (DISPLACED if any(override is not self for override in above) else None)
        if reason is not None and self.stand_aside is None:
            self.stand_aside = reason
            self.run.warn(reason)

    def __call__(self, func: Callable, *args, **kwargs) -> torch.Tensor:
        call = AttentionCall(func, args, kwargs, self.previous_override)
        self._check_displaced(kwargs.get("transformer_options"))
        if not all(hasattr(t, "shape") for t in args[:3]):  # a container this pack cannot even measure
            self.layers += 1
            self.run.stood_aside("q/k/v passed as objects without a shape")
            return call.run_default()
        kind, layout = self._classify(call.q_len, call.k_len)
        plan = self.plans.get(self.layers)
        if plan is not None and plan.before_attention and kind != self._planned_kinds[self.layers]:
            raise RuntimeError(f"FastAttn: attention call {self.layers} of {self.run.patch.adapter.name} is a {kind} "
                               f"call, but its projections were mapped to a {self._planned_kinds[self.layers]} call "
                               "(a model variant this pack does not know). Please report it; remove the sharing "
                               "nodes meanwhile.")
        site = CallSite(self.step, self.run.timeline, self.layers, kind, layout, self.cond_or_uncond, self.chunk_ids,
                        self.halves, self.inputs, self.stand_aside, plan, self._unproven(kind))
        self.layers += 1
        report = self.run.report
        if report.forwards == 0:
            report.layers.append(LayerRecord(site.layer, kind, call.heads, call.head_dim, call.q_len, call.k_len, layout))
        out, computed, technique = self.run.patch.method(call, site, self.run)
        report.count(technique, computed, call.flops())
        self.full_flops += call.flops()
        return out

    def plan(self, projection: Projection, tokens: int) -> BranchPlan | None:
        """What the projections of `projection`'s layer do in this call, decided once per layer by
        the method when the first of them runs (None: they run as the host runs them). None too when
        that projection's input (`tokens` long) is not what the layout expects: the model added tokens
        inside its forward (reference images, padding), so its attention call cannot be placed either."""
        layer = projection.layer
        self._check_displaced()
        if layer not in self.plans:
            self._planned_kinds[layer] = projection.kind
            plan_branch = getattr(self.run.patch.method, "plan_branch", None)
            mapped = layer in self.run.patch.outputs and layer >= self.layers
            expected = {"image": math.prod(self.grid), "text": self.text_len, "context": self.context_len}
            expected["joint"] = expected["image"] + expected["text"]
            if plan_branch is None or not mapped or self.stand_aside is not None or self.run.block_replacements \
                    or tokens != expected[projection.tokens]:
                self.plans[layer] = None
            else:
                layout = self._layout(projection.kind)
                site = CallSite(self.step, self.run.timeline, layer, projection.kind, layout, self.cond_or_uncond,
                                self.chunk_ids, self.halves, self.inputs)
                self.plans[layer] = plan_branch(site, self.run, self.run.patch.outputs[layer])
        return self.plans[layer]

    def _layout(self, kind: str) -> TokenLayout:
        if kind == "joint":
            text_first = self.run.patch.adapter.text_first if self.layout_proof is None else self.layout_proof.text_first
            return TokenLayout(self.text_len, self.grid, text_first)
        return TokenLayout(0, self.grid)

    def _unproven(self, kind: str) -> str | None:
        """Why windows may not use this kind of call's layout (None: they may): a model without an
        adapter whose token order for such calls was not proven."""
        proof = self.layout_proof
        if proof is None or proof.kind == kind or kind not in ("joint", "image"):
            return None
        because = proof.reason or f"only its {proof.kind} calls' order was proven"
        return f"windows need a proven token order and this model has no adapter ({because})"

    def _classify(self, q_len: int, k_len: int) -> tuple[str, TokenLayout | None]:
        image_len = math.prod(self.grid)
        text_lens = (self.text_len, self.context_len)  # the joint call's text, or the prompt alone (refiners)
        if q_len != k_len:
            return "cross", TokenLayout(0, self.grid) if q_len == image_len else None
        if self.text_len and q_len == self.text_len + image_len:
            return "joint", self._layout("joint")
        if q_len == image_len and q_len in text_lens:
            return "unknown", None  # as long as the text: cannot tell image from text tokens
        if q_len == image_len:
            return "image", self._layout("image")
        if q_len in text_lens:
            return "text", None
        return "unknown", None

    def finish(self) -> None:
        report = self.run.report
        report.forwards += 1
        report.steps_seen.add(self.step)
        report.layers_per_forward.add(self.layers)
        report.batch_halves.add(self.cond_or_uncond)


COND, UNCOND, OTHER = 0, 1, -1  # a batch chunk's role for CFG sharing


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
        raise UnsupportedArchitectureError(
            f"block caching knows the blocks of SD3 (MMDiT), Flux, Chroma, HunyuanVideo and Wan 2.1 models; this {adapter.name} model is "
            "not one of them: calibrate without block caching (switch block_cache off)")
    return blocks


def patch_of(model) -> AttentionPatch | None:
    """The holder installed on a patched model, if any."""
    return model.model_options.get("transformer_options", {}).get(PATCH_KEY)
