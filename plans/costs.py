"""What each calibration candidate costs a layer: attention FLOPs, or the measured time of its
attention call on the running device (a short probe: the median of a few runs, remembered per
device and shape for the session and on disk (timings.py), so a second calibration of the same
model probes nothing, after a restart too), and the table of those prices shown to the user.

FLOPs miss what the issue that asked for time measured: a narrow window still pays the kernel's
fixed costs, and skipping a call saves its launch. Time misses nothing but is noisy, so plans
searched on it are not bit-for-bit reproducible; FLOPs are (tests use them)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..kernels import attention_flops, window_attention
from ..kernels.backends import choose_backend
from ..patching import AttentionCall, CallSite
from ..patching.schedule import WindowSize
from . import timings
from .schema import BLOCK, TECHNIQUE_LABELS, HeadSet, LayerInfo

COST_MEASURES = ("time", "flops")
PROBE_RUNS = 5  # timed runs per probe (after one warm-up); their median is the cost
# A probe whose slowest run took this many times its fastest ran beside other work on the device: it is timed
# once more, and a time still that unsteady prices this session only (on disk it would price every calibration
# on this device for timings.MAX_AGE_S)
UNSTEADY = 1.5
_clock = time.perf_counter  # what probes are timed by (tests replace it)
_seconds: dict[tuple, float] = {}  # probe key (device, shape, kind) -> median seconds, for the session


def probe_seconds(key: tuple, run: Callable[[], object], device: torch.device) -> float:
    """Median wall time of `run()` over PROBE_RUNS runs after a warm-up, remembered under `key`
    for the session and, for this device, on disk (where its runs were steady: UNSTEADY)."""
    if key not in _seconds:
        identity = timings.device_identity(device)
        seconds = timings.stored_seconds(identity, repr(key))
        if seconds is None:
            samples = _timed_runs(run, device)
            if _unsteady(samples):
                samples = _timed_runs(run, device)
            seconds = statistics.median(samples)
            if not _unsteady(samples):
                timings.store_seconds(identity, repr(key), seconds)
        _seconds[key] = seconds
    return _seconds[key]


class LinearFlops(TorchFunctionMode):
    """Counts the FLOPs of the linear layers run inside it (2 per multiply-add of F.linear): what a
    block costs besides its attention calls, whichever module classes and shapes it has."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self.flops += 2 * (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1]
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timed run counts it."""
    getattr(getattr(torch, device.type, None), "synchronize", lambda: None)()


def _timed_runs(run: Callable[[], object], device: torch.device) -> list[float]:
    """The seconds of PROBE_RUNS runs of `run()`, after a warm-up."""
    run()
    samples = []
    for _ in range(PROBE_RUNS):
        synchronize(device)
        start = _clock()
        run()
        synchronize(device)
        samples.append(_clock() - start)
    return samples


def _unsteady(samples: list[float]) -> bool:
    return max(samples) > UNSTEADY * min(samples)


@dataclass(frozen=True)
class Prices:
    """One layer's cost of each kind of call, whole batch and conditional half (CFG sharing)."""

    full: float
    full_half: float
    windows: dict[float, tuple[float, float]]  # window fraction -> (whole batch, half)
    measure: str = "flops"  # of the prices: "time" (seconds) or "flops"


@dataclass(frozen=True)
class LayerSlot:
    """One attention layer as the first forward saw it: its FLOPs per technique (the plan's
    flops_kept) and its prices (the budget search's cost: FLOPs or measured time)."""

    info: LayerInfo
    compressible: bool  # joint / image self-attention with an image grid
    full_flops: int
    window_flops: dict[float, int]  # window fraction -> FLOPs of the window call
    prices: Prices
    # block caching: what skipping the block this layer begins saves besides its attention, in the prices' measure
    block_saving: float = 0.0

    def cost(self, technique: str, heads: HeadSet = None, fraction: float | None = None) -> float:
        """Attention FLOPs of `technique` (a window of `fraction`, the first searched if None, on
        `heads` only: full attention on the others)."""
        window = self.window_flops[next(iter(self.window_flops)) if fraction is None else fraction]
        base = {"ast": 0, BLOCK: 0, "full": self.full_flops, "full+asc": self.full_flops}.get(technique, window)
        if heads is not None and technique.startswith("wars"):
            share = len(heads) / self.info.heads
            base = share * window + (1 - share) * self.full_flops
        return base / 2 if technique.endswith("+asc") else base

    def price(self, technique: str, fraction: float | None = None) -> float:
        """The search's cost of `technique` (with a window of `fraction`) on this layer."""
        if technique == "ast":
            return 0.0
        if technique == BLOCK:  # its attention and the rest of its block not run: below zero
            return -self.block_saving
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
                    {size.fraction: (window_seconds(call, size), window_seconds(half, size)) for size in windows}, "time")
    return LayerSlot(info, compressible, full, window_flops, prices)


def cost_table(layers: list[LayerSlot]) -> str:
    """The price per call of each candidate on each compressible layer (layers of one shape share a
    row), in ms of measured time or in attention GFLOPs, and as a share of full attention: what the
    search weighed, shown by Calibrate. A markdown table, padded so that it reads as plain text too."""
    groups: list[tuple[LayerSlot, list[int]]] = []
    for index, slot in enumerate(layers):
        if slot.compressible:
            members = next((members for first, members in groups if first == slot), None)
            if members is None:
                groups.append((slot, [index]))
            else:
                members.append(index)
    full_only = [index for index, slot in enumerate(layers) if not slot.compressible]
    kinds = ", ".join(sorted({layers[index].info.kind for index in full_only}))
    tail = [f"Layers {_spans(full_only)} ({kinds}): always full attention, not priced."] if full_only else []
    if not groups:
        return "\n".join(["No compressible attention layer: nothing to price.", *tail])
    measure = groups[0][0].prices.measure
    fractions = sorted({fraction for slot, _ in groups for fraction in slot.prices.windows})
    columns = [("full", None), ("full+asc", None),
               *[(name, fraction) for fraction in fractions for name in ("wars", "wars+asc")], ("ast", None),
               *([(BLOCK, None)] if any(slot.block_saving for slot, _ in groups) else [])]
    header = ["layers", "kind", "heads x dim", *[name if fraction is None else f"{name} {fraction:g}"
                                                 for name, fraction in columns]]
    rows = [header]
    for slot, members in groups:
        cells = [_price_cell(slot.price(name, fraction), slot.price("full"), measure)
                 if fraction is None or fraction in slot.prices.windows else "-" for name, fraction in columns]
        rows.append([_spans(members), slot.info.kind, f"{slot.info.heads} x {slot.info.head_dim}", *cells])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    unit = "ms of attention time measured on this device" if measure == "time" else "attention GFLOPs"
    legend = "; ".join(f"{name}: {TECHNIQUE_LABELS[name]}" for name in dict.fromkeys(name for name, _ in columns))
    block = (["A block cache's price is below zero: skipping the block also saves its projections and MLP "
              "(their FLOPs, priced at the layer's attention cost per FLOP)."] if columns[-1][0] == BLOCK else [])
    return "\n".join([f"Price per attention call of each candidate, in {unit} (x: share of full attention)", "",
                      *lines, "", f"{legend}; the number after wars is the window fraction.", *block, *tail])


def _price_cell(price: float, full: float, measure: str) -> str:
    if price == 0:
        return "0"
    amount = f"{price * 1e3:.3g} ms" if measure == "time" else f"{price / 1e9:.3g} GFLOPs"
    return f"{amount} ({price / full:.2f}x)" if full else amount


def _spans(indices: list[int]) -> str:
    """Sorted layer indices as runs: [0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
