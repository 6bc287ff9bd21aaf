"""Step reuse: a whole model call skipped, its prediction taken from the steps that computed one.

A plan may mark a step "reuse" (the model's prediction of the last computed step, as core
LazyCache / EasyCache and FORA reuse outputs) or "forecast" (a first-order extrapolation in noise
level from the last two computed steps, as TaylorSeer forecasts features). What is reused is the
prediction as a noise estimate, (x - denoised) / sigma: the velocity of a flow model, the noise of
an epsilon model. It changes slowly from step to step, where the denoised image itself moves with
sigma. Predictions are kept per batch chunk (cache.py), so each conditioning, evaluation of a step
and context window reads only its own; a call with nothing to read is computed.
"""

from __future__ import annotations

import torch

from .cache import CacheOwner, Entry, store_chunks

STEP_REUSE = ("reuse", "forecast")  # how a plan step may take its prediction from earlier steps
LAST, BEFORE = ("prediction", "last"), ("prediction", "before")  # cache keys: the last two computed


def noise_estimate(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model's prediction as a noise estimate: (x - denoised) / sigma, sigma per batch row."""
    return (x - denoised) / _rows(sigma, x)


def forecast(last: torch.Tensor, before: torch.Tensor, sigmas: tuple[float, float], sigma: float) -> torch.Tensor:
    """The noise estimate at `sigma`, extrapolated linearly in sigma from the estimates `last` and
    `before` made at `sigmas` (last's, before's)."""
    at_last, at_before = sigmas
    slope = (last - before) / (at_last - at_before)
    return last + slope * (sigma - at_last)


def store(run: CacheOwner, ids: tuple, step: int, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> None:
    """Keep this computed call's noise estimate per chunk, the previous one moving to BEFORE."""
    for chunk_id in ids:
        if (*LAST, chunk_id) in run.cache:
            run.cache[(*BEFORE, chunk_id)] = run.cache[(*LAST, chunk_id)]
    made_for = (tuple(x.shape[1:]), float(sigma.flatten()[0]))  # the shape it serves, the sigma it was made at
    store_chunks(run, LAST, ids, step, noise_estimate(x, denoised, sigma), made_for)


def reused(run: CacheOwner, ids: tuple, step: int, x: torch.Tensor, sigma: torch.Tensor,
           how: str) -> torch.Tensor | None:
    """The denoised output this call gets by step reuse `how`, or None if the chunks lack what it reads
    (predictions of earlier steps for this very shape; two of them, made at one sigma each, to forecast)."""
    keys = (LAST, BEFORE) if how == "forecast" else (LAST,)
    found: list[list[Entry]] = []
    for key in keys:
        entries = [run.cache.get((*key, chunk_id)) for chunk_id in ids]
        if any(entry is None or entry.step >= step or entry.made_for[0] != tuple(x.shape[1:]) for entry in entries):
            return None
        found.append(entries)
    estimate = torch.cat([entry.tensor for entry in found[0]])
    if how == "forecast":
        made_at = [{entry.made_for[1] for entry in entries} for entries in found]
        if any(len(sigmas) > 1 for sigmas in made_at) or made_at[0] == made_at[1]:
            return None  # chunks computed at different noise levels: no one line through them
        (at_last,), (at_before,) = made_at
        estimate = forecast(estimate, torch.cat([entry.tensor for entry in found[1]]), (at_last, at_before),
                            float(sigma.flatten()[0]))
    return x - _rows(sigma, x) * estimate.to(x.dtype)


def _rows(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma shaped to broadcast over x's batch rows (a scalar, or one value per row)."""
    sigma = sigma.to(x.dtype).flatten()
    return sigma.view(-1, *([1] * (x.dim() - 1)))
