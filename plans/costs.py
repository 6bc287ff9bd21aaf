"""What each calibration candidate costs a layer: attention FLOPs, or the measured time of its
attention call on the running device (a short probe: the median of a few runs, remembered per
device and shape for the session and on disk (timings.py), so a second calibration of the same
model probes nothing, after a restart too).

FLOPs miss what the issue that asked for time measured: a narrow window still pays the kernel's
fixed costs, and skipping a call saves its launch. Time misses nothing but is noisy, so plans
searched on it are not bit-for-bit reproducible; FLOPs are (tests use them)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels import attention_flops, window_attention
from ..kernels.backends import choose_backend
from ..patching import AttentionCall, CallSite
from ..patching.schedule import WindowSize
from . import timings
from .schema import HeadSet, LayerInfo

COST_MEASURES = ("time", "flops")
PROBE_RUNS = 5  # timed runs per probe (after one warm-up); their median is the cost
_seconds: dict[tuple, float] = {}  # probe key (device, shape, kind) -> median seconds, for the session


def probe_seconds(key: tuple, run: Callable[[], object], device: torch.device) -> float:
    """Median wall time of `run()` over PROBE_RUNS runs after a warm-up, remembered under `key`
    for the session and, for this device, on disk."""
    if key not in _seconds:
        identity = timings.device_identity(device)
        seconds = timings.stored_seconds(identity, repr(key))
        if seconds is None:
            seconds = _median_seconds(run, device)
            timings.store_seconds(identity, repr(key), seconds)
        _seconds[key] = seconds
    return _seconds[key]


def _median_seconds(run: Callable[[], object], device: torch.device) -> float:
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", lambda: None)
    run()
    samples = []
    for _ in range(PROBE_RUNS):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@dataclass(frozen=True)
class Prices:
    """One layer's cost of each kind of call, whole batch and conditional half (CFG sharing)."""

    full: float
    full_half: float
    windows: dict[float, tuple[float, float]]  # window fraction -> (whole batch, half)


@dataclass(frozen=True)
class LayerSlot:
    """One attention layer as the first forward saw it: its FLOPs per technique (the plan's
    flops_kept) and its prices (the budget search's cost: FLOPs or measured time)."""

    info: LayerInfo
    compressible: bool  # joint / image self-attention with an image grid
    full_flops: int
    window_flops: dict[float, int]  # window fraction -> FLOPs of the window call
    prices: Prices

    def cost(self, technique: str, heads: HeadSet = None, fraction: float | None = None) -> float:
        """Attention FLOPs of `technique` (a window of `fraction`, the first searched if None, on
        `heads` only: full attention on the others)."""
        window = self.window_flops[next(iter(self.window_flops)) if fraction is None else fraction]
        base = {"ast": 0, "full": self.full_flops, "full+asc": self.full_flops}.get(technique, window)
        if heads is not None and technique.startswith("wars"):
            share = len(heads) / self.info.heads
            base = share * window + (1 - share) * self.full_flops
        return base / 2 if technique.endswith("+asc") else base

    def price(self, technique: str, fraction: float | None = None) -> float:
        """The search's cost of `technique` (with a window of `fraction`) on this layer."""
        if technique == "ast":
            return 0.0
        if technique.startswith("full"):
            return self.prices.full_half if technique.endswith("+asc") else self.prices.full
        whole, half = self.prices.windows[fraction]
        return half if technique.endswith("+asc") else whole


def layer_slot(call: AttentionCall, site: CallSite, compressible: bool, windows: tuple[WindowSize, ...],
               measure: str) -> LayerSlot:
    """The slot of the layer making `call`, its prices measured as `measure` says ("time": probed now)."""
    full = call.flops()
    backend = choose_backend("auto", call.q.device)  # as the runtime runs and prices it
    window_flops = {size.fraction: full for size in windows}
    if compressible:
        window_flops = {size.fraction: attention_flops(site.layout, size.window_for(site.layout), batch=call.batch,
                                                       heads=call.heads, head_dim=call.head_dim,
                                                       backend=backend).computed for size in windows}
    info = LayerInfo(site.kind, call.heads, call.head_dim)
    if measure == "flops" or not compressible:
        prices = Prices(full, full / 2, {fraction: (flops, flops / 2) for fraction, flops in window_flops.items()})
        return LayerSlot(info, compressible, full, window_flops, prices)
    half = call.select(slice(0, max(1, call.batch // 2)))
    shape = (str(call.q.device), call.q.dtype, call.batch, call.heads, call.q_len, call.k_len, call.head_dim,
             site.layout, backend)

    def window_seconds(sub: AttentionCall, size: WindowSize) -> float:
        q, k, v = sub.heads_first()
        window = size.window_for(site.layout)
        return probe_seconds(("window", window, sub.batch, *shape), lambda: window_attention(
            q, k, v, site.layout, window, backend=backend, scale=call.scale), call.q.device)

    prices = Prices(probe_seconds(("full", call.batch, *shape), call.run_default, call.q.device),
                    probe_seconds(("full", half.batch, *shape), half.run_default, call.q.device),
                    {size.fraction: (window_seconds(call, size), window_seconds(half, size)) for size in windows})
    return LayerSlot(info, compressible, full, window_flops, prices)

