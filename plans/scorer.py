"""Local errors of the budget and fast searches' candidates, measured in a sampling run: each attention
layer's candidates scored on its attention output against the layer's full one (Scorer), and each
block's change (what it adds to its streams, patching/block_cache.py) against its change 1..ages steps
earlier (BlockScorer). Both are relative squared errors of what one piece of the forward adds to the
residual stream: the units the budget search sums under its budget."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..kernels import window_attention
from ..patching import AttentionCall, CallSite
from ..patching.ditfastattn import in_batch_copies
from ..patching.schedule import WindowSize
from ..patching.state import COND, UNCOND
from .schema import HeadSet
from .search import Candidate

K = TypeVar("K", bound="Kept")


def squared_error_per_head(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """||approx_h - exact_h||^2 per head h of [B, H, N, D] tensors, in float64."""
    return (approx.double() - exact.double()).square().sum(dim=(0, 2, 3))


def relative_squared_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||^2 / ||exact||^2, in float64."""
    exact = exact.double()
    return ((approx.double() - exact).square().sum() / exact.square().sum().clamp_min(1e-24)).item()


def share_cfg(tensor: torch.Tensor, copies: dict[int, int], chunks: int) -> torch.Tensor:
    """`tensor` (`chunks` batch chunks) as CFG sharing makes it: each unconditional chunk of `copies`
    replaced by the conditional chunk it copies (`in_batch_copies`, as the runtime copies)."""
    parts = tensor.chunk(chunks)
    return torch.cat([parts[copies.get(chunk, chunk)] for chunk in range(chunks)])


def guided(tensor: torch.Tensor, halves: tuple[int, ...], cfg: float | None) -> torch.Tensor | None:
    """What the sampler's CFG makes of a batch of one conditional and one unconditional chunk:
    uncond + cfg x (cond - uncond); None for any other batch (or no `cfg`)."""
    if cfg is None or sorted(halves) != [COND, UNCOND]:
        return None
    chunks = tensor.chunk(2)
    cond, uncond = chunks[halves.index(COND)], chunks[halves.index(UNCOND)]
    return uncond + cfg * (cond - uncond)


def guided_errors(approx: dict, exact: torch.Tensor, halves: tuple[int, ...], cfg: float | None,
                  dims: tuple[int, ...]) -> tuple[dict, torch.Tensor] | None:
    """Squared errors (summed over `dims`) of each approximation's CFG combination against the exact one's,
    and the norm they are relative to (the chunks' mean squared norm: an error both halves share in equal
    measure then weighs as without CFG, an error of one half alone as the guider amplifies it); None where
    the batch is not one conditional and one unconditional chunk."""
    target = guided(exact.double(), halves, cfg)
    if target is None:
        return None
    errors = {key: (guided(out.double(), halves, cfg) - target).square().sum(dim=dims) for key, out in approx.items()}
    return errors, exact.double().square().sum(dim=dims) / 2


@dataclass(frozen=True)
class Kept:
    """What one model call's batch chunks computed at a step, kept for later steps to read: read by calls of the
    same chunks (as the runtime's caches), or joined with the other CFG half's where the host ran them apart."""

    step: int
    chunks: tuple  # the call's chunk identities (CallSite.chunk_ids)
    halves: tuple[int, ...]  # the chunks' roles (CallSite.halves)

    def joined(self, other: Kept) -> Kept:
        """This entry and `other` (the same step, other chunks) as one batch, this one's chunks first."""
        raise NotImplementedError


@dataclass(frozen=True)
class Computed(Kept):
    """What a layer computed at a step, as a later candidate reads it."""

    output: torch.Tensor  # heads first: what step sharing after it reuses
    residuals: dict[float, torch.Tensor] | None  # window fraction -> full - window (a full step's), else None

    def joined(self, other: Computed) -> Computed:
        residuals = None if self.residuals is None or other.residuals is None else {
            fraction: torch.cat([residual, other.residuals[fraction]]) for fraction, residual in self.residuals.items()}
        return Computed(self.step, self.chunks + other.chunks, self.halves + other.halves,
                        torch.cat([self.output, other.output]), residuals)


def other_half(history: list[K], step: int, chunks: tuple, halves: tuple[int, ...]) -> K | None:
    """What the other CFG half computed at `step`, in an earlier model call (the host ran the halves apart)."""
    return next((entry for entry in history if entry.step == step and not set(entry.chunks) & set(chunks)
                 and sorted(entry.halves + halves) == [COND, UNCOND]), None)


def readable(history: list[K], step: int, groups: tuple[tuple, ...]) -> list[K]:
    """The entries of steps before `step` kept for every one of the chunk `groups` (one call's, or two calls'),
    each step's joined into one batch, oldest first."""
    by_step: dict[int, dict[tuple, K]] = {}
    for entry in history:
        if entry.step < step and entry.chunks in groups:
            by_step.setdefault(entry.step, {})[entry.chunks] = entry
    return [functools.reduce(lambda a, b: a.joined(b), (found[group] for group in groups))
            for _, found in sorted(by_step.items()) if len(found) == len(groups)]


class Scorer:
    """Local scores: each candidate's attention output against the layer's full one, as squared
    errors per head, from which whole-layer and per-head relative errors follow.

    Fast mode (`ages` None) scores what applying its choices so far would read: step sharing the
    output the layer last computed (older than the last step where that step shared too), window +
    residual the residual of the layer's last full step. The budget search (`ages` n, on a run with
    full attention) scores every age from 1 to n steps of both, at every window size, on the CFG
    combination (`cfg`) of a batch of one conditional and one unconditional chunk: CFG sharing errs in the
    unconditional half alone, which the guider amplifies by (cfg - 1).

    What a layer computed is kept per model call's batch chunks and read by calls of the same chunks, as
    the runtime's caches are. Where the host runs a step's CFG halves as two calls (short of free memory),
    the budget search scores the second call joined with what the first computed at that step: the CFG
    combination of both halves, as one batched call would be scored."""

    def __init__(self, windows: tuple[WindowSize, ...], candidates: tuple[str, ...], ages: int | None = None,
                 cfg: float | None = None) -> None:
        self.windows = windows
        self.candidates = candidates
        self.ages = ages
        self.cfg = cfg
        self.history: dict[int, list[Computed]] = {}  # layer -> what it computed, oldest first
        # this step's full output and residuals, what CFG sharing copies (in_batch_copies) and the chunk count
        self.pending: dict[int, tuple[Computed, dict[int, int], int]] = {}
        self.squared_errors: dict[int, dict[Candidate, torch.Tensor]] = {}  # layer -> candidate -> [heads]
        self.squared_norms: dict[int, torch.Tensor] = {}  # layer -> ||full output||^2 per head

    def _sources(self, layer: int, step: int, groups: tuple[tuple, ...]) -> tuple[list[Computed], list[Computed]]:
        """What step sharing and window + residual may read at `step` for a batch of the chunk `groups` (one
        call's, or two calls' joined): the latest (fast mode) or every one within the ages (budget)."""
        history = readable(self.history.get(layer, []), step, groups)
        full_steps = [entry for entry in history if entry.residuals is not None]
        if self.ages is None:
            return history[-1:], full_steps[-1:]
        return ([entry for entry in history if step - entry.step <= self.ages],
                [entry for entry in full_steps if step - entry.step <= self.ages])

    def score(self, call: AttentionCall, site: CallSite, full: torch.Tensor) -> None:
        full_heads = call.output_heads_first(full)
        copies, chunks = in_batch_copies(site), len(site.chunk_ids)  # what CFG sharing copies, as the runtime
        residuals = None
        if any(name.startswith("wars") for name in self.candidates):
            q, k, v = call.heads_first()
            residuals = {size.fraction: full_heads - window_attention(q, k, v, site.layout, size.window_for(site.layout),
                                                                      scale=call.scale)
                         for size in self.windows}
        own = Computed(site.step, site.chunk_ids, site.halves, full_heads, residuals)
        self.pending[site.layer] = own, copies, chunks
        other = None if self.ages is None else other_half(self.history.get(site.layer, []), site.step, own.chunks,
                                                          own.halves)  # budget mode: the other CFG half, run apart
        now = own if other is None else other.joined(own)  # scored as the batch both calls make
        shared, full_steps = self._sources(site.layer, site.step, (own.chunks,) if other is None else
                                           (other.chunks, own.chunks))
        exact = now.output
        approx: dict[Candidate, torch.Tensor] = {}
        if "ast" in self.candidates:
            approx.update({("ast", 0.0, site.step - entry.step): entry.output for entry in shared
                           if entry.output.shape == exact.shape})
        if copies:  # also what the unwindowed heads of a per-head wars+asc cell compute
            approx[("full+asc", 0.0, 0)] = share_cfg(exact, copies, chunks)
        if now.residuals is not None:
            for entry in full_steps:
                for fraction, residual in entry.residuals.items():
                    if residual.shape == exact.shape:  # window + older residual = full - residual now + older
                        approx[("wars", fraction, site.step - entry.step)] = exact - now.residuals[fraction] + residual
        if copies:
            approx.update({("wars+asc", *key[1:]): share_cfg(out, copies, chunks) for key, out in approx.items()
                           if key[0] == "wars"})
        approx = {key: out for key, out in approx.items() if key[0] in self.candidates or key[0] == "full+asc"}
        scored = guided_errors(approx, exact, now.halves, self.cfg, (0, 2, 3)) if self.ages is not None else None
        if scored is not None:
            self.squared_errors[site.layer], self.squared_norms[site.layer] = scored
            return
        self.squared_norms[site.layer] = exact.double().square().sum(dim=(0, 2, 3))
        self.squared_errors[site.layer] = {key: squared_error_per_head(out, exact) for key, out in approx.items()}

    def relative_errors(self, layer: int) -> dict[Candidate, float]:
        """Each candidate's relative squared error over the whole layer (the budget search's error)."""
        total = self.squared_norms[layer].sum().clamp_min(1e-24)
        return {key: (errors.sum() / total).item() for key, errors in self.squared_errors[layer].items()
                if key[0] in self.candidates}

    def options(self, layer: int, candidates: list[str], delta: float,
                per_head: bool) -> list[tuple[str, HeadSet, float]]:
        """Each of `candidates` whose relative error is within delta, as (technique, heads,
        error). With `per_head`, a window technique too large an error for the whole layer
        may still apply to the heads whose own error is within delta (the others full)."""
        errors = {key[0]: value for key, value in self.squared_errors.get(layer, {}).items()}  # one per technique
        norms = self.squared_norms.get(layer)
        found: list[tuple[str, HeadSet, float]] = []
        if norms is None:
            return found
        total = norms.sum().clamp_min(1e-24)
        for name in candidates:
            if name not in errors:
                continue
            error = (errors[name].sum() / total).sqrt().item()
            if error <= delta:
                found.append((name, None, error))
                continue
            own = (errors[name] / norms.clamp_min(1e-24)).sqrt() <= delta
            others = errors.get("full+asc") if name.endswith("+asc") else torch.zeros_like(norms)
            if not (per_head and name.startswith("wars") and own.any() and others is not None):
                continue
            mixed = (torch.where(own, errors[name], others).sum() / total).sqrt().item()
            if mixed <= delta:
                found.append((name, tuple(own.nonzero().flatten().tolist()), mixed))
        return found

    def _output(self, layer: int, technique: str, heads: HeadSet) -> torch.Tensor:
        """The attention output `technique` (fast mode: its one window) gave this layer at this step."""
        now, copies, chunks = self.pending[layer]
        out = now.output
        if technique.startswith("wars"):
            (fraction, older), = self._sources(layer, now.step, (now.chunks,))[1][-1].residuals.items()
            out = now.output - now.residuals[fraction] + older  # window + the older residual
            if heads is not None:
                windowed = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
                windowed[list(heads)] = True
                out = torch.where(windowed[:, None, None], out, now.output)
        return share_cfg(out, copies, chunks) if technique.endswith("+asc") else out

    def commit(self, assignment: dict[int, str], heads: dict[int, HeadSet]) -> None:
        """The step is decided: layers that computed keep their output for a later AST (a shared
        layer keeps the older one, as the runtime does), full ones refresh their residual."""
        for layer, (now, *_) in self.pending.items():
            name = assignment.get(layer, "full")
            if name == "ast":
                continue
            residuals = now.residuals if name.startswith("full") else None
            history = [*self.history.get(layer, []), Computed(now.step, now.chunks, now.halves,
                                                               self._output(layer, name, heads.get(layer)), residuals)]
            self.history[layer] = self._kept(history, now.step)
        self.pending.clear()
        self.squared_errors.clear()
        self.squared_norms.clear()

    def _kept(self, history: list[Computed], step: int) -> list[Computed]:
        """The entries a later step may still read (fast mode: of each call's chunks, the last and the last full one)."""
        if self.ages is not None:
            return [entry for entry in history if step + 1 - entry.step <= self.ages]
        kept = []
        for chunks in dict.fromkeys(entry.chunks for entry in history):
            own = [entry for entry in history if entry.chunks == chunks]
            last_full = [entry for entry in own if entry.residuals is not None][-1:]
            kept += [entry for entry in own if entry is own[-1] or any(entry is full for full in last_full)]
        return kept


Changes = list[torch.Tensor | None]  # one per stream the block returns (None: a stream it returns as None)


@dataclass(frozen=True)
class BlockChange(Kept):
    """What a block added to its streams at a step."""

    changes: Changes

    def joined(self, other: BlockChange) -> BlockChange:
        return BlockChange(self.step, self.chunks + other.chunks, self.halves + other.halves,
                           [None if a is None or b is None else torch.cat([a, b])
                            for a, b in zip(self.changes, other.changes, strict=True)])


class BlockScorer:
    def __init__(self, ages: int, cfg: float | None = None) -> None:
        self.ages = ages
        self.cfg = cfg  # changes scored on their CFG combination, as Scorer scores attention outputs
        self.history: dict[int, list[BlockChange]] = {}  # block's first layer -> its changes, oldest first
        self.errors: dict[int, dict[int, float]] = {}  # block's first layer -> age -> error, at the step scored last

    def score(self, step: int, layer: int, changes: Changes, halves: tuple[int, ...] = (), chunks: tuple = ()) -> None:
        """Score the change of the block beginning at `layer` at `step` (its batch chunks' roles `halves`,
        identities `chunks`) against its kept changes of the same chunks (joined with the other CFG half's, as
        Scorer joins them, where the host ran the halves apart)."""
        history = [entry for entry in self.history.get(layer, []) if step - entry.step <= self.ages]
        own = BlockChange(step, chunks, halves, changes)
        other = other_half(history, step, chunks, halves) if changes else None
        now = own if other is None else other.joined(own)
        self.errors[layer] = {}
        streams = [index for index, change in enumerate(now.changes) if change is not None]
        for old in readable(history, step, (chunks,) if other is None else (other.chunks, chunks)):
            if _same_shapes(old.changes, now.changes):
                error = norm = 0.0
                for index in streams:
                    scored = guided_errors({0: old.changes[index]}, now.changes[index], now.halves, self.cfg, ())
                    if scored is None:  # not one conditional and one unconditional chunk: the batch as it is
                        scored = {0: (old.changes[index].double() - now.changes[index].double()).square().sum()}, \
                            now.changes[index].double().square().sum()
                    error, norm = error + scored[0][0], norm + scored[1]
                if norm > 0:
                    self.errors[layer][step - old.step] = float(error / norm)
        self.history[layer] = [*history, own] if changes else history


def _same_shapes(old: Changes, new: Changes) -> bool:
    return len(old) == len(new) and all((a is None) == (b is None) and (a is None or a.shape == b.shape)
                                        for a, b in zip(old, new, strict=True))
