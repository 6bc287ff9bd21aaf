"""Native CPU backend: one compiled flash-attention loop over the tile plan (the CPU fast path).

The torch tile backend drives ATen's flash kernel tile by tile: each tile of 64 queries is its
own call (which works in 32-query blocks), the text keys are a second pass merged through
log-sum-exps, and gathered keys are copied by torch ops. Here one C++ call per head walks all
its tiles (native/span_attention.cpp): every tile is one online softmax over its image keys
(read in place where contiguous) and the text keys, in 64-query blocks. Pooled keys, which
every image query sees, follow in parts (made one at a time, as in the torch backend), each a
call that resumes the rows' softmax from the previous call's output and log-sum-exp.

The C++ source is compiled for this CPU's vector instructions (about a minute, cached by torch
under ~/.cache/torch_extensions): by `make setup`, and for ComfyUI users on a background thread
started when the pack loads (`build_in_background`), so that no sample waits for it; until it is
ready "auto" uses the torch backend. Where it cannot be built, `available()` says so and "auto"
falls back to the torch backend; a failed build is tried again in the background ten minutes later
(a failure may be transient: another process holding torch's build lock, a full disk).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .layout import TokenLayout
from .pooling import pooled_parts
from .problem import Problem
from .tiles import default_tile, tile_plan
from .window import Window
from .workers import run_all

SOURCE = Path(__file__).with_name("native") / "span_attention.cpp"
TEXT_ROWS = 64  # text queries per tile (they see every key)
POOLED_KEYS = 256  # pooled keys made and attended at once (each part is freed before the next)
# compiler flags matching what torch itself dispatches to on this CPU (ATen's vector types)
ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
}
log = logging.getLogger(__name__)


@functools.cache
def extension() -> ModuleType:
    """The compiled kernel (built on the first call in a fresh cache; raises if it cannot be)."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # a venv whose bin/ is not on PATH: torch looks for ninja there
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ISA_FLAGS.get(capability, [])
    name = f"fastattn_span_attention_{capability.lower() if flags else 'default'}"
    log.info("FastAttn: loading the native CPU kernel %s (built once, about a minute)", name)
    return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", *flags], verbose=False)


_build_lock = threading.Lock()  # one build at a time: the background one and a caller's
RETRY_AFTER_S = 600.0  # a failed build is tried again, in the background, this long after


@dataclass
class BuildState:
    """Where the kernel's build stands in this process: loaded, it stays loaded; a failure (no
    compiler, but also a transient one: another process holding torch's build lock, a full disk)
    holds only until RETRY_AFTER_S later."""

    loaded: bool = False
    failed_at: float | None = None  # _clock() of the last failed build


_state = BuildState()
_clock = time.monotonic


def available() -> bool:
    """Whether the kernel is loaded here: built (or loaded from torch's cache) on the first call;
    after a failed build (the reason is logged), False until RETRY_AFTER_S later, when a background
    build tries again (no sample waits for it)."""
    if _state.loaded:
        return True
    if sys.platform == "win32" or not hasattr(torch.backends.cpu, "get_cpu_capability"):
        return False
    if _state.failed_at is None:
        return _build()
    if _clock() - _state.failed_at >= RETRY_AFTER_S and not building():
        _state.failed_at = _clock()  # one retry per period, however long it takes
        build_in_background()
    return False


def _build() -> bool:
    """Build or load the kernel now (any failure means: the torch backend until the next try)."""
    with _build_lock:
        if _state.loaded:
            return True
        try:
            extension()
        except Exception as error:
            level = logging.WARNING if _state.failed_at is None else logging.INFO  # warned once, retries quieter
            log.log(level, "FastAttn: the native CPU kernel is unavailable (%s); using the torch backend, trying "
                    "again in %d minutes", error, RETRY_AFTER_S // 60)
            _state.failed_at = _clock()
            return False
        _state.loaded = True
    return True


_background: list[threading.Thread] = []  # the latest background build


def _build_and_report() -> None:
    if _build():
        log.info("FastAttn: the native CPU kernel is ready")


def build_in_background() -> threading.Thread:
    """Build (or load from the cache) the kernel on a daemon thread, unless one is under way or the
    kernel is loaded; returns the latest such thread."""
    if not _background or (not _background[-1].is_alive() and not _state.loaded):
        thread = threading.Thread(target=_build_and_report, name="fastattn-native-build", daemon=True)
        _background[:] = [thread]
        thread.start()
    return _background[-1]


def building() -> bool:
    """Whether the background build is under way (calls meanwhile use the torch backend)."""
    return bool(_background) and _background[-1].is_alive()


@dataclass(frozen=True)
class TileRuns:
    """Tiles as the kernel reads them: runs (start, length) of query rows and of key rows per
    tile, and each tile's 0/1 mask over its first keys (or -1: it sees all of them)."""

    query_offsets: Tensor  # [tiles + 1]: tile t's query runs are query_runs[offsets[t]:offsets[t + 1]]
    query_runs: Tensor  # [runs, 2]
    key_offsets: Tensor
    key_runs: Tensor
    mask_of_tile: Tensor  # [tiles]
    mask_starts: Tensor  # [masks]: where each mask starts in `masks`
    mask_cols: Tensor  # [masks]: its width (the tile's masked keys); rows are the tile's queries
    masks: Tensor  # uint8, all masks flattened
    max_rows: int  # the most queries in one tile

    def arguments(self) -> tuple:
        return (
            self.query_offsets,
            self.query_runs,
            self.key_offsets,
            self.key_runs,
            self.mask_of_tile,
            self.mask_starts,
            self.mask_cols,
            self.masks,
            self.max_rows,
        )


def _runs(index: Tensor, offset: int) -> list[tuple[int, int]]:
    """Sorted indices as runs of consecutive values, shifted by `offset`."""
    breaks = (torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *breaks, index.numel()]
    return [(int(index[a]) + offset, b - a) for a, b in itertools.pairwise(bounds)]


def _tile_runs(tiles: list[tuple[list, list, int]], masks: list[Tensor]) -> TileRuns:
    """Pack (query runs, key runs, mask id or -1) per tile and the masks into tensors."""

    def packed(lists: list[list]) -> tuple[Tensor, Tensor]:
        offsets = torch.tensor([0] + [len(runs) for runs in lists]).cumsum(0)
        return offsets, torch.tensor([run for runs in lists for run in runs], dtype=torch.long).view(-1, 2)

    query_offsets, query_runs = packed([t[0] for t in tiles])
    key_offsets, key_runs = packed([t[1] for t in tiles])
    sizes = [m.numel() for m in masks]
    return TileRuns(
        query_offsets,
        query_runs,
        key_offsets,
        key_runs,
        torch.tensor([t[2] for t in tiles], dtype=torch.long),
        torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)
        if masks
        else torch.zeros(0, dtype=torch.long),
        torch.tensor([m.shape[1] for m in masks], dtype=torch.long),
        torch.cat([m.reshape(-1) for m in masks]).to(torch.uint8)
        if masks
        else torch.zeros(0, dtype=torch.uint8),
        max(sum(length for _, length in t[0]) for t in tiles),
    )


@functools.lru_cache(maxsize=32)
def span_plan(layout: TokenLayout, window: Window) -> TileRuns:
    """Text rows in tiles that see every key; image tiles of the torch backend's plan (its tile
    shape, whole key sets) that see their window's image keys (masked) and then the text."""
    text = [(layout.text_start, layout.text_len)] if layout.text_len else []
    tiles = [
        ([(row, min(TEXT_ROWS, layout.text_start + layout.text_len - row))], [(0, layout.seq_len)], -1)
        for row in range(layout.text_start, layout.text_start + layout.text_len, TEXT_ROWS)
    ]
    plan = tile_plan(layout, window, default_tile(layout, window), gather_keys=layout.image_len)
    for run in plan.runs:
        tile = run.first
        step = 0 if run.count == 1 else tile.query_span[1] - tile.query_span[0]
        mask = -1 if tile.mask is None else tile.mask
        for i in range(run.count):
            queries = _runs(tile.queries + i * step, layout.image_start)
            tiles.append((queries, _runs(tile.keys + i * step, layout.image_start) + text, mask))
    return _tile_runs(tiles, plan.masks)


@functools.lru_cache(maxsize=32)
def _pooled_plan(layout: TokenLayout, pooled_keys: int) -> TileRuns:
    """Image rows in tiles of TEXT_ROWS, each seeing all `pooled_keys` rows of a pooled part."""
    start, stop = layout.image_start, layout.image_start + layout.image_len
    rows = [
        ([(row, min(TEXT_ROWS, stop - row))], [(0, pooled_keys)], -1) for row in range(start, stop, TEXT_ROWS)
    ]
    return _tile_runs(rows, [])


def window_attention(p: Problem) -> Tensor:
    if p.q.device.type != "cpu":
        raise ValueError(f"the native backend runs on CPU only, got {p.q.device}; use backend='auto'")
    native = extension()
    layout, window = p.layout, p.window
    batch, heads, seq, dim = p.q.shape
    q, k, v = (x.reshape(batch * heads, seq, dim).float().contiguous() for x in (p.q, p.k, p.v))
    out = torch.empty_like(q)
    local = span_plan(layout, window).arguments()

    def one_head(h: int) -> None:
        lse = q.new_empty(seq)
        native.attend_tiles(q[h], k[h], v[h], out[h], lse, *local, p.scale, False)
        if not window.pool:
            return
        for pooled_k, pooled_v in pooled_parts(
            k[h, None, None], v[h, None, None], layout, window, p.pool_weight, POOLED_KEYS
        ):
            part = _pooled_plan(layout, pooled_k.shape[2]).arguments()
            native.attend_tiles(q[h], pooled_k[0, 0], pooled_v[0, 0], out[h], lse, *part, p.scale, True)

    run_all(one_head, range(batch * heads), p.q.device)
    out = out.view(batch, heads, seq, dim).to(p.q.dtype)
    return out if p.residual is None else out.add_(p.residual)


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """(query, key) pairs computed: shared keys densely, image keys per tile (the torch backend's)."""
    return (
        window.shared_pairs(layout) + tile_plan(layout, window, default_tile(layout, window)).computed_pairs
    )
