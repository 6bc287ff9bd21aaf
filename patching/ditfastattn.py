"""DiTFastAttn as an attention method: carries out a Schedule with the run's caches.

Caches live in the SamplingRun (dropped when sampling ends), keyed by layer and batch half
(0 = conditional, 1 = unconditional), and are filled only when a later step will read them:
a layer's output when the next step reuses it, its residual (full - window, per head,
before the output projection) when the next computed step uses the window.
Where a technique cannot apply to a call (no image grid, an attention mask, a cache that is
missing or from another shape) the call is computed in full: never a silently wrong result.
"""

from __future__ import annotations

import logging

import torch

from ..kernels import TokenLayout, attention_flops, window_attention
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
        halves = _halves(call, site)
        if choice.compute == "reuse":
            stored = _gather(run, "output", site.layer, halves, call.output_shape)
            if stored is not None:
                return stored, 0, "step sharing"
            choice = Choice("full", choice.share_cfg)
        if choice.share_cfg and 0 in halves:
            out, flops, technique = self._cfg_shared(call, site, run, choice, halves)
        elif choice.share_cfg and (cached := _gather(run, "cfg", site.layer, (0,) * len(halves), call.output_shape,
                                                     stored_at=site.step)) is not None:
            out, flops, technique = cached, 0, "cfg sharing"  # unconditional call after its conditional one
        else:
            if choice.share_cfg:
                _log_once(run, "FastAttn: CFG sharing skipped an unconditional call made apart from its conditional "
                               "one: the conditional output was not available first or has another shape (ComfyUI "
                               "runs the halves apart under low memory or when prompt lengths differ).")
            out, flops, technique = self._compute(call, site, run, choice, halves)
        if self.schedule.choose(site.step + 1, site.total_steps, site.layer).compute == "reuse":
            _store(run, "output", site.layer, halves, site.step, out)
        return out, flops, technique

    def _cfg_shared(self, call: AttentionCall, site: CallSite, run: SamplingRun, choice: Choice,
                    halves: tuple[int, ...]) -> tuple[torch.Tensor, int, str]:
        """Compute the conditional chunk(s) only; every other chunk gets a copy."""
        if halves == (0,) * len(halves):  # a conditional-only call: the unconditional call may follow
            out, flops, technique = self._compute(call, site, run, choice, halves)
            _store(run, "cfg", site.layer, halves, site.step, out)
            return out, flops, technique
        chunk = call.batch // len(halves)
        first = halves.index(0)
        rows = slice(first * chunk, (first + 1) * chunk)
        out, flops, technique = self._compute(call.select(rows), site, run, choice, (0,))
        return torch.cat([out] * len(halves)), flops, f"{technique} + cfg sharing"

    def _compute(self, call: AttentionCall, site: CallSite, run: SamplingRun, choice: Choice,
                 halves: tuple[int, ...]) -> tuple[torch.Tensor, int, str]:
        layout = site.layout if site.kind in WINDOWED_KINDS and call.mask is None else None
        if choice.compute == "window" and layout is not None:
            q, k, v = call.heads_first()
            residual = _gather(run, "residual", site.layer, halves, q.shape) if choice.residual else None
            if residual is not None or not choice.residual:
                window = choice.window.window_for(layout)
                out = window_attention(q, k, v, layout, window, residual=residual, backend=self.backend)
                technique = "window+residual" if choice.residual else "window"
                return call.format_output(out), self._flops(call, layout, window), technique
        out = call.run_default()
        flops = call.flops()
        residual_window = self.schedule.residual_window(site.step, site.total_steps, site.layer)
        if residual_window is not None and layout is not None:
            flops += self._cache_residual(call, site, run, halves, out, layout, residual_window)
        return out, flops, "full"

    def _cache_residual(self, call: AttentionCall, site: CallSite, run: SamplingRun, halves: tuple[int, ...],
                        full: torch.Tensor, layout: TokenLayout, size: WindowSize) -> int:
        q, k, v = call.heads_first()
        window = size.window_for(layout)
        windowed = window_attention(q, k, v, layout, window, backend=self.backend)
        _store(run, "residual", site.layer, halves, site.step, call.output_heads_first(full) - windowed)
        return self._flops(call, layout, window)

    def _flops(self, call: AttentionCall, layout: TokenLayout, window) -> int:
        return attention_flops(layout, window, batch=call.batch, heads=call.heads, head_dim=call.head_dim).computed

    def finish_run(self, run: SamplingRun) -> None:
        shares_cfg = any(isinstance(t, CFGSharing) for t in self.schedule.techniques)
        if shares_cfg and not any(1 in halves for halves in run.report.batch_halves):
            logging.info("FastAttn: CFG sharing did nothing: this run had no unconditional batch (CFG 1).")


def _log_once(run: SamplingRun, message: str) -> None:
    if ("logged", message) not in run.cache:
        run.cache[("logged", message)] = True
        logging.info(message)


def _halves(call: AttentionCall, site: CallSite) -> tuple[int, ...]:
    """The batch half of each chunk; one chunk of unknown half if the batch does not split."""
    halves = site.cond_or_uncond
    if not halves or call.batch % len(halves):
        return (-1,)
    return halves


def _store(run: SamplingRun, kind: str, layer: int, halves: tuple[int, ...], step: int, tensor: torch.Tensor) -> None:
    for half, chunk in zip(halves, tensor.chunk(len(halves)), strict=False):
        run.cache[(kind, layer, half)] = (step, chunk)


def _gather(run: SamplingRun, kind: str, layer: int, halves: tuple[int, ...], shape: torch.Size,
            stored_at: int | None = None) -> torch.Tensor | None:
    """The cached chunks for these halves, concatenated; None if any is missing, was stored
    at another step than `stored_at` (when given), or the result is not of `shape`."""
    chunks = []
    for half in halves:
        entry = run.cache.get((kind, layer, half))
        if entry is None or (stored_at is not None and entry[0] != stored_at):
            return None
        chunks.append(entry[1])
    out = torch.cat(chunks)
    return out if out.shape == shape else None
