"""DiTFastAttn as an attention method: carries out a Schedule with the run's caches.

The techniques act on self-attention over image tokens only (joint text + image, or image
alone), as the paper patches `attn1`: cross-attention and text-only calls always run as the host
computes them (sharing a cross-attention across CFG halves would turn CFG off).

Caches live in the SamplingRun (dropped when sampling ends), keyed by layer and by each batch
chunk's identity (its conditioning, context window, device, and which evaluation of the step it
is), and each entry says what it was made for (token layout, window): a layer's output when the
next step reuses it, its residual (full - window, per head, before the output projection) when
a later step uses that window. A cache that is missing or was made for something else is never
used: the call is computed in full and the report says why. Where the adapter maps a layer's
projections, sharing acts on the whole branch (branch.py): the output projections store the
projected output instead, and `plan_branch` tells them and the QKV projections what to skip.
"""

from __future__ import annotations

import torch

from ..kernels import TokenLayout, Window, attention_flops, window_attention
from ..kernels.backends import choose_backend
from . import block_cache
from .block_cache import BlockCall
from .cache import Entry, gather_chunks, store_chunks
from .call import AttentionCall
from .padding import hidden_text_keys, padded_window_attention
from .schedule import Choice, LocalAttention, Schedule, WindowResidual
from .site import BranchPlan, CallSite
from .state import COND, UNCOND, ForwardPass, SamplingRun
from .timeline import Timeline

SELF_ATTENTION_KINDS = ("joint", "image")
FULL = Choice("full")


class DiTFastAttn:
    caches_blocks = False  # whether a step may skip whole blocks (a plan's "block" cells): the runtime hooks them

    def __init__(self, schedule: Schedule, backend: str = "auto", skip_branch: bool = True) -> None:
        self.schedule = schedule
        self.backend = backend
        self.skip_branch = skip_branch  # share whole attention branches where the adapter maps them

    @property
    def windows(self) -> bool:
        """Whether some call may be windowed (the runtime then proves a generic model's token order)."""
        techniques = getattr(self.schedule, "techniques", None)
        return techniques is None or any(isinstance(t, (WindowResidual, LocalAttention)) for t in techniques)

    def plan_branch(self, site: CallSite, run: SamplingRun, outputs: tuple[str, ...]) -> BranchPlan | None:
        """What the projections of this layer's branch do in this forward (asked before its attention
        call): skip it on a step-shared layer whose `outputs` were all stored, store them when the
        next step reuses them, and compute conditional rows only where CFG sharing copies within
        the batch. The attention call then decides the same from the same state."""
        if not self.skip_branch:
            return None
        choice = self.schedule.choose(site.step, site.timeline, site.layer)
        made_for = (site.layout,)
        if choice.compute == "reuse":
            cached = {path: gather_chunks(run, ("branch", site.layer, path), site.chunk_ids, made_for, site.step)
                      for path in outputs}
            if all(tensor is not None for tensor in cached.values()):
                return BranchPlan(site.layer, site.step, site.chunk_ids, made_for, cached=cached)
            choice = Choice("full", choice.share_cfg)
        sources = in_batch_copies(site) if choice.share_cfg else {}
        sources = sources if len(sources) == site.halves.count(UNCOND) else {}  # else the attention call copies
        store = self._next_reuses(site.step, site.timeline, site.layer)
        return BranchPlan(site.layer, site.step, site.chunk_ids, made_for, store=store, sources=sources)

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
        choice = self.schedule.choose(site.step, site.timeline, site.layer)
        reason = _stands_aside(call, site)
        if site.branch is not None and site.branch.before_attention and reason is not None:
            raise RuntimeError(f"FastAttn: layer {site.layer}'s projections were already skipped for sharing, but its "
                               f"attention call cannot be shared ({reason}). Please report this with your workflow; "
                               "remove the step/CFG sharing nodes meanwhile.")
        if site.branch is not None and site.branch.skip:  # the block's output projections return the stored output
            return call.q.new_zeros(call.output_shape), 0, "step sharing"
        if reason is not None:
            if choice != FULL:
                run.stood_aside(reason)
            return call.run_default(), call.flops(), "full"
        if choice.compute == "block":  # its block ran after all (block_cache.py)
            run.stood_aside("block caching computed the block: no change of it was stored for this call (the first of "
                            "its kind in the run, or another shape), or the layer does not begin a block")
            choice = Choice("full")
        if choice.compute == "window" and site.layout_unproven is not None:
            run.stood_aside(site.layout_unproven)
            choice = Choice("full", choice.share_cfg)
        if choice.compute == "reuse":
            stored = gather_chunks(run, ("output", site.layer), site.chunk_ids, (site.layout,), site.step)
            if stored is not None and stored.shape == call.output_shape:
                return stored, 0, "step sharing"
            run.stood_aside("step sharing had no output of this layer stored for this call (the first of its kind "
                            "in the run, or another shape)")
            choice = Choice("full", choice.share_cfg)
        out, flops, technique = self._with_cfg_sharing(call, site, run, choice)
        if self._next_reuses(site.step, site.timeline, site.layer) and site.branch is None:  # else the output projections store the branch's output
            store_chunks(run, ("output", site.layer), site.chunk_ids, site.step, out, (site.layout,))
        return out, flops, technique

    def run_block(self, call: BlockCall, forward: ForwardPass) -> object:
        """A block whose first layer's choice is "block" returns its stored change (block_cache.py);
        it runs where none is stored, and keeps its change where a later step skips it."""
        step, timeline, layer = forward.step, forward.run.timeline, forward.layers
        if self.schedule.choose(step, timeline, layer).compute == "block":
            result = block_cache.reused(call, forward)
            if result is not None:
                return result
        keep = any(self.schedule.choose(later, timeline, layer).compute == "block"
                   for later in range(step + 1, timeline.steps))
        result, changes = block_cache.computed(call, forward, keep)
        block_cache.store(forward, call.block, changes)
        return result

    def _next_reuses(self, step: int, timeline: Timeline, layer: int) -> bool:
        """Whether the next step that runs this layer's block shares its output (steps that skip the
        block read nothing of the layer's)."""
        for later in range(step + 1, timeline.steps):
            compute = self.schedule.choose(later, timeline, layer).compute
            if compute != "block":
                return compute == "reuse"
        return False

    def _with_cfg_sharing(self, call: AttentionCall, site: CallSite, run: SamplingRun,
                          choice: Choice) -> tuple[torch.Tensor, int, str]:
        """Compute every chunk except the unconditional ones that can copy a conditional output of
        this step with the same model input (in this batch, or from a call just before)."""
        chunks = len(site.chunk_ids)
        if not choice.share_cfg:
            return self._compute(call, site, run, choice, site.chunk_ids)
        if COND not in site.halves and UNCOND not in site.halves:
            run.stood_aside("CFG sharing needs ComfyUI's CFG guider (positive, negative); this guider orders its "
                            "conditionings otherwise")
            return self._compute(call, site, run, choice, site.chunk_ids)
        copies = {i: _cfg_source(run, site, i) for i, half in enumerate(site.halves) if half == UNCOND}
        for i in [i for i, source in copies.items() if source is None]:
            del copies[i]
            run.stood_aside("CFG sharing found no conditional output of this step to copy to an unconditional call "
                            "(other prompt lengths, area conditioning, or the conditional call came after)")
        computed = [i for i in range(chunks) if i not in copies]
        parts: dict[int, torch.Tensor] = {}
        flops, technique = 0, ""
        if computed:
            size = call.batch // chunks
            rows = torch.cat([torch.arange(i * size, (i + 1) * size) for i in computed]).to(call.q.device)
            sub = call if len(computed) == chunks else call.select(rows)
            out, flops, technique = self._compute(sub, site, run, choice, tuple(site.chunk_ids[i] for i in computed))
            parts = dict(zip(computed, out.chunk(len(computed)), strict=True))
            for i in computed:  # the first conditional output of the step, for an unconditional call after
                key = ("cfg", site.layer, site.chunk_ids[i][1:])
                if site.halves[i] == COND and getattr(run.cache.get(key), "step", None) != site.step:
                    run.cache[key] = Entry(site.step, parts[i], (site.layout,), site.inputs[i])
        for i, source in copies.items():
            parts[i] = parts[source] if isinstance(source, int) else source
        out = torch.cat([parts[i] for i in range(chunks)])
        if not copies:
            return out, flops, technique
        return out, flops, f"{technique} + cfg sharing" if technique else "cfg sharing"

    def _compute(self, call: AttentionCall, site: CallSite, run: SamplingRun, choice: Choice,
                 ids: tuple) -> tuple[torch.Tensor, int, str]:
        layout = site.layout
        if choice.compute == "window":
            q, k, v = call.heads_first()
            window = choice.window.window_for(layout)
            residual = None
            if choice.residual:
                residual = gather_chunks(run, ("residual", site.layer), ids, (layout, window), site.step)
                residual = residual if residual is not None and residual.shape == q.shape else None
            hidden = hidden_text_keys(call.mask, layout, call.batch)
            pool_weight = choice.pool_weights.get(site.layer) if choice.pool_weights else None
            fits = _fits(run, window, layout)
            if fits and hidden is None:
                run.stood_aside("an attention mask other than a text padding mask")
            elif fits and choice.residual and residual is None:
                run.stood_aside("window + residual had no residual cached for this window and call (the first of "
                                "its kind in the run, or another shape)")
            elif fits and choice.heads is not None:
                return self._window_on_heads(q, k, v, call, layout, window, hidden, residual, choice.heads)
            elif fits:
                out = self._window(q, k, v, call, layout, window, hidden, pool_weight)
                out = out if residual is None else out + residual
                return call.format_output(out), self._flops(call, layout, window), \
                    "window+residual" if choice.residual else "window"
        out = call.run_default()
        flops = call.flops()
        size = None if site.layout_unproven else self.schedule.residual_window(site.step, site.timeline, site.layer)
        hidden = hidden_text_keys(call.mask, layout, call.batch) if size is not None else None
        if hidden is not None:
            q, k, v = call.heads_first()
            window = size.window_for(layout)
            windowed = self._window(q, k, v, call, layout, window, hidden)
            store_chunks(run, ("residual", site.layer), ids, site.step, call.output_heads_first(out) - windowed,
                         (layout, window))
            flops += self._flops(call, layout, window)
        return out, flops, "full"

    def _window_on_heads(self, q, k, v, call: AttentionCall, layout, window, hidden: list[torch.Tensor],
                         residual: torch.Tensor | None, heads: tuple[int, ...]) -> tuple[torch.Tensor, int, str]:
        """A per-head plan's cell: window (+ residual) on `heads`, full attention on the others."""
        windowed = torch.tensor(heads, device=q.device)
        dense = torch.tensor([h for h in range(call.heads) if h not in heads], dtype=torch.long, device=q.device)
        part = self._window(q[:, windowed], k[:, windowed], v[:, windowed], call, layout, window, hidden)
        part = part if residual is None else part + residual[:, windowed]
        out = part.new_empty(q.shape)
        out[:, windowed] = part
        flops = self._flops(call, layout, window, heads=len(heads))
        if dense.numel():
            out[:, dense] = call.dense_heads(dense).to(part.dtype)
            flops += call.flops() * dense.numel() // call.heads
        technique = "window+residual" if residual is not None else "window"
        return call.format_output(out), flops, f"{technique} on some heads"

    def _window(self, q, k, v, call: AttentionCall, layout, window, hidden: list[torch.Tensor],
                pool_weight: torch.Tensor | None = None) -> torch.Tensor:
        if all(row.numel() == 0 for row in hidden):
            return window_attention(q, k, v, layout, window, backend=self.backend, scale=call.scale,
                                    pool_weight=pool_weight)
        if window.pool:
            raise ValueError("FastAttn: pooled keys with a text padding mask are not supported; remove the CLEAR "
                             "pooling (pool = off) for this model.")
        return padded_window_attention(q, k, v, layout, window, hidden, scale=call.scale, backend=self.backend)

    def _flops(self, call: AttentionCall, layout, window, heads: int | None = None) -> int:
        """Attention FLOPs the backend that runs this call computes (its tiles or blocks), on all
        the call's heads or on `heads` of them."""
        backend = choose_backend(self.backend, call.q.device)
        return attention_flops(layout, window, batch=call.batch, heads=call.heads if heads is None else heads,
                               head_dim=call.head_dim, backend=backend).computed

    def finish_run(self, run: SamplingRun) -> None:
        if self.schedule.shares_cfg and not any(1 in halves for halves in run.report.batch_halves):
            run.stood_aside("CFG sharing did nothing: this run had no unconditional batch (CFG 1)")


def _stands_aside(call: AttentionCall, site: CallSite) -> str | None:
    """Why no technique may touch this call, if none may."""
    if site.stand_aside is not None:
        return site.stand_aside
    if site.kind == "cross":
        return "cross-attention (the techniques act on self-attention only)"
    if site.kind not in SELF_ATTENTION_KINDS:
        return f"{site.kind} attention call with no image grid (text-only refiners, or a length that cannot be placed)"
    return call.unreadable()


def _cfg_source(run: SamplingRun, site: CallSite, chunk: int) -> int | torch.Tensor | None:
    """What an unconditional chunk copies: a conditional chunk of this call with the same model
    input, else the output a conditional call of this step stored for it, else None."""
    other = _in_batch_source(site, chunk)
    if other is not None:
        return other
    entry = run.cache.get(("cfg", site.layer, site.chunk_ids[chunk][1:]))
    if (entry is None or entry.step != site.step or entry.made_for != (site.layout,)
            or entry.model_input.shape != site.inputs[chunk].shape
            or not torch.equal(entry.model_input, site.inputs[chunk])):
        return None
    return entry.tensor


def in_batch_copies(site: CallSite) -> dict[int, int]:
    """What CFG sharing copies within this call's batch: unconditional chunk -> the first conditional
    chunk with the same model input (unconditional chunks without one are left out; none when the
    batch does not split into the call's chunks)."""
    if len(site.inputs) != len(site.chunk_ids):
        return {}
    found = {i: _in_batch_source(site, i) for i, half in enumerate(site.halves) if half == UNCOND}
    return {i: source for i, source in found.items() if source is not None}


def _in_batch_source(site: CallSite, chunk: int) -> int | None:
    """The first conditional chunk of this call with the same model input as `chunk`, if any."""
    return next((other for other, half in enumerate(site.halves)
                 if half == COND and torch.equal(site.inputs[other], site.inputs[chunk])), None)


def _fits(run: SamplingRun, window: Window, layout: TokenLayout) -> bool:
    """Whether `window` applies to this grid (pooling needs sides it divides; circles need a
    2D grid); if not, the call is computed in full and the report says why."""
    try:
        window.check(layout)
    except ValueError as error:
        run.stood_aside(f"the window cannot apply: {error}")
        return False
    return True
