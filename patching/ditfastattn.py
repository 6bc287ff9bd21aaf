"""DiTFastAttn as an attention method: carries out a Schedule with the run's caches.

The techniques act on self-attention over image tokens only (joint text + image, or image
alone), as the paper patches `attn1`: cross-attention and text-only calls always run as the host
computes them (sharing a cross-attention across CFG halves would turn CFG off).

Caches live in the SamplingRun (dropped when sampling ends), keyed by layer and by each batch
chunk's identity (its conditioning, context window, device, and which evaluation of the step it
is), and each entry says what it was made for (token layout, window): a layer's output when the
next step reuses it, its residual (full - window, per head, before the output projection) when
a later step uses that window. A cache that is missing or was made for something else is never
used: the call is computed in full and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import attention_flops, window_attention
from ..kernels.backends import choose_backend
from .call import AttentionCall
from .padding import hidden_text_keys, padded_window_attention
from .report import CallSite
from .runtime import COND, UNCOND, SamplingRun
from .schedule import Choice, Schedule

SELF_ATTENTION_KINDS = ("joint", "image")
FULL = Choice("full")


@dataclass(frozen=True)
class Entry:
    """A cached tensor, the step that made it, and what it was made for."""

    step: int
    tensor: torch.Tensor
    made_for: tuple  # (layout,) for outputs; (layout, window) for residuals
    model_input: torch.Tensor | None = None  # for CFG copies: the chunk's model input


class DiTFastAttn:
    def __init__(self, schedule: Schedule, backend: str = "auto") -> None:
        self.schedule = schedule
        self.backend = backend

    def __call__(self, call: AttentionCall, site: CallSite, run: SamplingRun) -> tuple[torch.Tensor, int, str]:
        choice = self.schedule.choose(site.step, site.total_steps, site.layer)
        reason = _stands_aside(call, site)
        if reason is not None:
            if choice != FULL:
                run.stood_aside(reason)
            return call.run_default(), call.flops(), "full"
        if choice.compute == "reuse":
            stored = _gather(run, "output", site.layer, site.chunk_ids, call.output_shape, (site.layout,), site.step)
            if stored is not None:
                return stored, 0, "step sharing"
            run.stood_aside("step sharing had no output of this layer stored for this call (the first of its kind "
                            "in the run, or another shape)")
            choice = Choice("full", choice.share_cfg)
        out, flops, technique = self._with_cfg_sharing(call, site, run, choice)
        if self.schedule.choose(site.step + 1, site.total_steps, site.layer).compute == "reuse":
            _store(run, "output", site.layer, site.chunk_ids, site.step, out, (site.layout,))
        return out, flops, technique

    def _with_cfg_sharing(self, call: AttentionCall, site: CallSite, run: SamplingRun,
                          choice: Choice) -> tuple[torch.Tensor, int, str]:
        """Compute every chunk except the unconditional ones that can copy a conditional output of
        this step with the same model input (in this batch, or from a call just before)."""
        chunks = len(site.chunk_ids)
        if not choice.share_cfg or chunks == 0 or len(site.inputs) != chunks:
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
                residual = _gather(run, "residual", site.layer, ids, q.shape, (layout, window), site.step)
            hidden = hidden_text_keys(call.mask, layout, call.batch)
            if hidden is None:
                run.stood_aside("an attention mask other than a text padding mask")
            elif choice.residual and residual is None:
                run.stood_aside("window + residual had no residual cached for this window and call (the first of "
                                "its kind in the run, or another shape)")
            else:
                out = self._window(q, k, v, call, layout, window, hidden)
                out = out if residual is None else out + residual
                return call.format_output(out), self._flops(call, layout, window), \
                    "window+residual" if choice.residual else "window"
        out = call.run_default()
        flops = call.flops()
        size = self.schedule.residual_window(site.step, site.total_steps, site.layer)
        hidden = hidden_text_keys(call.mask, layout, call.batch) if size is not None else None
        if hidden is not None:
            q, k, v = call.heads_first()
            window = size.window_for(layout)
            windowed = self._window(q, k, v, call, layout, window, hidden)
            _store(run, "residual", site.layer, ids, site.step, call.output_heads_first(out) - windowed, (layout, window))
            flops += self._flops(call, layout, window)
        return out, flops, "full"

    def _window(self, q, k, v, call: AttentionCall, layout, window, hidden: list[torch.Tensor]) -> torch.Tensor:
        if all(row.numel() == 0 for row in hidden):
            return window_attention(q, k, v, layout, window, backend=self.backend, scale=call.scale)
        return padded_window_attention(q, k, v, layout, window, hidden, scale=call.scale, backend=self.backend)

    def _flops(self, call: AttentionCall, layout, window) -> int:
        """Attention FLOPs the backend that runs this call computes (its tiles or blocks)."""
        backend = choose_backend(self.backend, call.q.device)
        return attention_flops(layout, window, batch=call.batch, heads=call.heads, head_dim=call.head_dim,
                               backend=backend).computed

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
    for other, half in enumerate(site.halves):
        if half == COND and torch.equal(site.inputs[other], site.inputs[chunk]):
            return other
    entry = run.cache.get(("cfg", site.layer, site.chunk_ids[chunk][1:]))
    if (entry is None or entry.step != site.step or entry.made_for != (site.layout,)
            or entry.model_input.shape != site.inputs[chunk].shape
            or not torch.equal(entry.model_input, site.inputs[chunk])):
        return None
    return entry.tensor


def _store(run: SamplingRun, kind: str, layer: int, ids: tuple, step: int, tensor: torch.Tensor,
           made_for: tuple) -> None:
    for chunk_id, chunk in zip(ids, tensor.chunk(len(ids)), strict=True):
        run.cache[(kind, layer, chunk_id)] = Entry(step, chunk, made_for)


def _gather(run: SamplingRun, kind: str, layer: int, ids: tuple, shape: torch.Size, made_for: tuple,
            before_step: int) -> torch.Tensor | None:
    """The cached chunks for these ids, concatenated; None if any is missing, was made at this
    step or later, or for something else (another layout or window), or the result is not of
    `shape` (another resolution or batch)."""
    entries = [run.cache.get((kind, layer, chunk_id)) for chunk_id in ids]
    if any(entry is None or entry.step >= before_step or entry.made_for != made_for for entry in entries):
        return None
    out = torch.cat([entry.tensor for entry in entries])
    return out if out.shape == shape else None
