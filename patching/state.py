"""The runtime's state at its three lifetimes, apart from the hooks that create it (runtime.py).

    AttentionPatch   the holder stored on a patched model clone: the method, the adapter, the
                     last run's report; no per-run state (ModelPatcher.clone() may copy it).
    SamplingRun      one sampling run: its timeline, the caches the methods keep, its report.
    ForwardPass      one model call: numbers and classifies each attention call and hands it to
                     the method; ACTIVE holds the one running now, for hooked projections
                     (branch.py) and blocks (block_cache.py).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
from comfy_execution.utils import get_executing_context

from ..kernels import TokenLayout
from .adapters import Adapter, Projection
from .call import AttentionCall
from .layout_proof import LayoutProof
from .report import LayerRecord, RunReport
from .site import BranchPlan, CallSite
from .timeline import Timeline

OVERRIDE_KEY = "optimized_attention_override"
CAPTURED = ("a CUDA graph capture ran the model: FastAttn's per-step choices cannot be recorded in a graph, so "
            "the run from then on uses the host's attention")
DISPLACED = ("another attention override was installed above FastAttn's inside the model's forward: FastAttn "
             "cannot number the attention calls it handles, so that forward uses the host's attention")
COND, UNCOND, OTHER = 0, 1, -1  # a batch chunk's role for CFG sharing


class AttentionMethod(Protocol):
    """Computes one attention call; returns the output, the attention FLOPs it computed and
    the name of the technique it used (the run's report tallies FLOPs per technique)."""

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]: ...


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


@dataclass(frozen=True)
class BlockFacts:
    """What a block did when it ran in this run: attention calls, their full FLOPs, and the form of
    its result (a tuple or one tensor; which streams come back as None, e.g. SD3's last context)."""

    layers: int
    flops: int
    single: bool
    missing: tuple[bool, ...]


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


ACTIVE: ContextVar[ForwardPass | None] = ContextVar("fastattn_forward", default=None)  # the model call running now
