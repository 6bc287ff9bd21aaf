"""DiTFastAttn as an attention method: carries out a Schedule with the run's caches.

Caches live in the SamplingRun (dropped when sampling ends), keyed by layer and batch chunk
(the host's id of each conditioning in the batch, so two positive prompts never share an
entry), and are filled only when a later step will read them:
a layer's output when the next step reuses it, its residual (full - window, per head,
before the output projection) when the next computed step uses the window.
Where a technique cannot apply to a call (no image grid, an attention mask, a cache that is
missing or from another shape) the call is computed in full: never a silently wrong result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..kernels import TokenLayout, Window, attention_flops, window_attention
from .call import AttentionCall
from .report import CallSite
from .runtime import SamplingRun
from .schedule import CFGSharing, Choice, Schedule, WindowSize

WINDOWED_KINDS = ("joint", "image")


class DiTFastAttn:
    def __init__(self, schedule: Schedule, backend: str = "auto") -> None:
        self.schedule = schedule
        self.backend = backend

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
        choice = self.schedule.choose(site.step, site.total_steps, site.layer)
        chunks = _chunks(call, site)
        if choice.compute == "reuse":
            stored = _gather(run, "output", site.layer, chunks.ids, call.output_shape)
            if stored is not None:
                return stored, 0, "step sharing"
            choice = Choice("full", choice.share_cfg)
        if choice.share_cfg and chunks.has_both_halves:
            out, flops, technique = self._cfg_in_batch(call, site, run, choice, chunks)
        elif choice.share_cfg and 0 in chunks.halves:  # the unconditional call may follow
            out, flops, technique = self._compute(call, site, run, choice, chunks.ids)
            run.cache[("cfg", site.layer)] = (site.step, out[: chunks.size])
        elif choice.share_cfg and (shared := _cfg_copy(run, site, chunks, call.output_shape)) is not None:
            out, flops, technique = shared, 0, "cfg sharing"
        else:
            if choice.share_cfg:
                _log_once(run, "FastAttn: CFG sharing skipped an unconditional call made apart from its conditional "
                               "one: the conditional output was not available first or has another shape (ComfyUI "
                               "runs the halves apart under low memory or when prompt lengths differ).")
            out, flops, technique = self._compute(call, site, run, choice, chunks.ids)
        if self.schedule.choose(site.step + 1, site.total_steps, site.layer).compute == "reuse":
            _store(run, "output", site.layer, chunks.ids, site.step, out)
        return out, flops, technique

    def _cfg_in_batch(self, call: AttentionCall, site: CallSite, run: SamplingRun, choice: Choice,
                      chunks: Chunks) -> tuple[torch.Tensor, int, str]:
        """Compute the conditional chunks only; each unconditional chunk gets the first one's output."""
        conditional = [i for i, half in enumerate(chunks.halves) if half == 0]
        rows = torch.cat([torch.arange(i * chunks.size, (i + 1) * chunks.size) for i in conditional])
        ids = tuple(chunks.ids[i] for i in conditional)
        out, flops, technique = self._compute(call.select(rows.to(call.q.device)), site, run, choice, ids)
        computed = dict(zip(conditional, out.chunk(len(conditional)), strict=True))
        first = computed[conditional[0]]
        return torch.cat([computed.get(i, first) for i in range(len(chunks.halves))]), flops, f"{technique} + cfg sharing"

    def _compute(self, call: AttentionCall, site: CallSite, run: SamplingRun, choice: Choice,
                 ids: tuple) -> tuple[torch.Tensor, int, str]:
        layout = site.layout if site.kind in WINDOWED_KINDS and call.mask is None else None
        if choice.compute == "window" and layout is not None:
            q, k, v = call.heads_first()
            residual = _gather(run, "residual", site.layer, ids, q.shape) if choice.residual else None
            window = choice.window.window_for(layout)
            if (residual is not None or not choice.residual) and _fits(run, window, layout):
                pool_weight = choice.pool_weights.get(site.layer) if choice.pool_weights else None
                out = window_attention(q, k, v, layout, window, residual=residual, pool_weight=pool_weight,
                                       backend=self.backend)
                technique = "window+residual" if choice.residual else "window"
                return call.format_output(out), self._flops(call, layout, window), technique
        out = call.run_default()
        flops = call.flops()
        residual_window = self.schedule.residual_window(site.step, site.total_steps, site.layer)
        if residual_window is not None and layout is not None:
            flops += self._cache_residual(call, site, run, ids, out, layout, residual_window)
        return out, flops, "full"

    def _cache_residual(self, call: AttentionCall, site: CallSite, run: SamplingRun, ids: tuple,
                        full: torch.Tensor, layout: TokenLayout, size: WindowSize) -> int:
        q, k, v = call.heads_first()
        window = size.window_for(layout)
        windowed = window_attention(q, k, v, layout, window, backend=self.backend)
        _store(run, "residual", site.layer, ids, site.step, call.output_heads_first(full) - windowed)
        return self._flops(call, layout, window)

    def _flops(self, call: AttentionCall, layout: TokenLayout, window) -> int:
        return attention_flops(layout, window, batch=call.batch, heads=call.heads, head_dim=call.head_dim).computed

    def finish_run(self, run: SamplingRun) -> None:
        shares_cfg = any(isinstance(t, CFGSharing) for t in self.schedule.techniques)
        if shares_cfg and not any(1 in halves for halves in run.report.batch_halves):
            logging.info("FastAttn: CFG sharing did nothing: this run had no unconditional batch (CFG 1).")


@dataclass(frozen=True)
class Chunks:
    """One call's batch as the host assembled it: chunks of `size` rows, each with its half
    (0 = conditional, 1 = unconditional) and a stable id."""

    halves: tuple[int, ...]
    ids: tuple
    size: int

    @property
    def has_both_halves(self) -> bool:
        return 0 in self.halves and 1 in self.halves


def _chunks(call: AttentionCall, site: CallSite) -> Chunks:
    halves = site.cond_or_uncond
    if not halves or call.batch % len(halves) or len(site.chunk_ids) != len(halves):
        return Chunks((-1,), ("batch",), call.batch)  # a batch we cannot split: one chunk, no CFG sharing
    return Chunks(halves, site.chunk_ids, call.batch // len(halves))


def _cfg_copy(run: SamplingRun, site: CallSite, chunks: Chunks, shape: torch.Size) -> torch.Tensor | None:
    """For an unconditional-only call: the conditional output of this step and layer, if it fits."""
    entry = run.cache.get(("cfg", site.layer))
    if entry is None or entry[0] != site.step:
        return None
    out = torch.cat([entry[1]] * len(chunks.halves))
    return out if out.shape == shape else None


def _fits(run: SamplingRun, window: Window, layout: TokenLayout) -> bool:
    """Whether `window` applies to this grid (pooling needs sides it divides; circles need a
    2D grid); if not, the call is computed in full and the log says why, once per run."""
    try:
        window.check(layout)
    except ValueError as error:
        _log_once(run, f"FastAttn: full attention where the window cannot apply: {error}")
        return False
    return True


def _log_once(run: SamplingRun, message: str) -> None:
    if ("logged", message) not in run.cache:
        run.cache[("logged", message)] = True
        logging.info(message)


def _store(run: SamplingRun, kind: str, layer: int, ids: tuple, step: int, tensor: torch.Tensor) -> None:
    for chunk_id, chunk in zip(ids, tensor.chunk(len(ids)), strict=True):
        run.cache[(kind, layer, chunk_id)] = (step, chunk)


def _gather(run: SamplingRun, kind: str, layer: int, ids: tuple, shape: torch.Size) -> torch.Tensor | None:
    """The cached chunks for these ids, concatenated; None if any is missing or the result is
    not of `shape` (another resolution or batch)."""
    entries = [run.cache.get((kind, layer, chunk_id)) for chunk_id in ids]
    if any(entry is None for entry in entries):
        return None
    out = torch.cat([entry[1] for entry in entries])
    return out if out.shape == shape else None
