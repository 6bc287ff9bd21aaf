"""Other libraries' local-attention kernels, timed beside ours by bench_gpu.py where they load.

Each peer takes one benchmark problem (our q, k, v [B, H, N, D] and window) and gives back the
call to time in its own layout (the layout change is made once, outside the timing: a model
using that library would keep its tensors that way) and a note on how its mask differs from ours,
or says why it does not apply. A peer whose package is missing or fails to load is reported as
"did not load: <why>", never skipped silently. None of them is installed in the project's venv;
tests/benchmarks/gpu_session.sh installs the wheels carried to the device machine.

- flash-attn `window_size=(r, r)`: the 1D band over the whole sequence (FA2 `flash_attn`, FA3
  `flash_attn_interface`); the same mask as ours only without text tokens.
- natten `na2d` / `na3d`: square neighbourhoods shifted inward at the grid's edges (ours are cut
  at the edges: the same number of keys for every query away from the edges).
- comfy-kitchen `na2d` / `na3d` (NATTEN's semantics) and `sol_attn` (routed block-sparse attention
  approximating full attention: its error against full attention is reported).
- st-attn (Sliding Tile Attention, FastVideo): tile-window attention on 6 x 8 x 8 tiles, only at
  the video shapes it was built for; its input must already be in tile order.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


class Unavailable(Exception):
    """A peer that cannot run this problem here; the message says why."""


def _load(module: str):
    try:
        return importlib.import_module(module)
    except Exception as error:  # missing, or built for another torch / CUDA
        raise Unavailable(f"did not load: {type(error).__name__}: {str(error).splitlines()[0][:160]}") from None


def _image_only(layout, what: str) -> None:
    if layout.text_len:
        raise Unavailable(f"does not apply: {what} has no text tokens that every query sees")


def _grid_layout(x: Tensor, grid: tuple[int, ...]) -> Tensor:
    """[B, H, N, D] -> [B, *grid, H, D] (NATTEN's and comfy-kitchen's layout)."""
    batch, heads, _, dim = x.shape
    return x.transpose(1, 2).reshape(batch, *grid, heads, dim).contiguous()


def _kernel(window, grid) -> list[int]:
    if window.shape != "square":
        raise Unavailable("does not apply: neighbourhoods are squares (this window is a " + window.shape + ")")
    spatial = [2 * window.radius + 1] * 2
    return ([2 * window.temporal_radius + 1] if len(grid) == 3 else []) + spatial


def flash_attn(layout, window, q, k, v) -> tuple[Callable[[], object], str]:
    if window.shape != "band":
        raise Unavailable("does not apply: flash-attn's window is a 1D band")
    _image_only(layout, "flash-attn's band")
    try:
        module = importlib.import_module("flash_attn_interface")  # FlashAttention 3 (Hopper)
        name = "FA3"
    except Exception:
        module, name = _load("flash_attn"), "FA2"
    q_, k_, v_ = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    size = (window.radius, window.radius)
    return lambda: module.flash_attn_func(q_, k_, v_, window_size=size), f"{name}, the same band"


def natten(layout, window, q, k, v) -> tuple[Callable[[], object], str]:
    _image_only(layout, "natten")
    kernel = _kernel(window, layout.grid)
    module = _load("natten")
    function = getattr(module, f"na{len(layout.grid)}d", None) or getattr(_load("natten.functional"),
                                                                       f"na{len(layout.grid)}d")
    q_, k_, v_ = (_grid_layout(x, layout.grid) for x in (q, k, v))
    version = getattr(module, "__version__", "?")
    return lambda: function(q_, k_, v_, kernel_size=tuple(kernel)), f"natten {version}, kernel {kernel}, shifted inward"


def kitchen_na(layout, window, q, k, v) -> tuple[Callable[[], object], str]:
    _image_only(layout, "comfy-kitchen's na2d / na3d")
    kernel = _kernel(window, layout.grid)
    module = _load("comfy_kitchen")
    function = module.na3d if len(layout.grid) == 3 else module.na2d
    q_, k_, v_ = (_grid_layout(x, layout.grid) for x in (q, k, v))
    return lambda: function(q_, k_, v_, kernel), f"na{len(layout.grid)}d kernel {kernel}, shifted inward"


def kitchen_sol(layout, window, q, k, v) -> tuple[Callable[[], object], str]:
    module = _load("comfy_kitchen")
    if not module.sol_attn_is_available(q.device):
        raise Unavailable("did not load: comfy_kitchen.sol_attn_is_available() is False on this GPU")
    q_, k_, v_ = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    text_blocks = -(-layout.text_len // 64)
    sinks = [layout.text_start // 64, layout.text_start // 64 + text_blocks] if layout.text_len else None

    def call() -> Tensor:
        return module.sol_attn(q_, k_, v_, sink_blocks=sinks)

    full = F.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2]).float()
    error = float((call()[:, :, :2].transpose(1, 2).float() - full).norm() / full.norm())
    return call, f"routed, approximates full attention: rel. error {error:.1e} against it (2 heads)"


ST_SHAPES = {(18, 48, 80): "18x48x80", (36, 48, 48): "36x48x48"}  # its image-only video shapes


def st_attn(layout, window, q, k, v) -> tuple[Callable[[], object], str]:
    _image_only(layout, "st-attn at its video shapes")
    shape = ST_SHAPES.get(tuple(layout.grid))
    if shape is None:
        raise Unavailable(f"does not apply: st-attn runs only at the grids {list(ST_SHAPES)}")
    module = _load("st_attn")
    if getattr(module, "sta_fwd", None) is None:
        raise Unavailable("did not load: st_attn's CUDA extension (st_attn_cuda) did not import")
    tiles = (3, 3, 3)  # a query tile sees the key tiles within one tile of it per axis
    sizes = [(tiles[0], tiles[1], tiles[2])] * q.shape[1]
    keeps = math.prod(min(3, n // t) for n, t in zip(layout.grid, (6, 8, 8), strict=True)) / math.prod(
        n // t for n, t in zip(layout.grid, (6, 8, 8), strict=True))
    return (lambda: module.sliding_tile_attention(q, k, v, sizes, 0, has_text=False, dit_seq_shape=shape),
            f"window {tiles} tiles of 6x8x8 (keeps at most {keeps:.0%}); input taken as already in tile order")


PEERS: dict[str, Callable] = {
    "flash-attn": flash_attn, "natten": natten, "comfy-kitchen na": kitchen_na,
    "comfy-kitchen sol-attn": kitchen_sol, "st-attn": st_attn,
}


def time_peers(names: tuple[str, ...], layout, window, q, k, v, median_ms: Callable) -> dict[str, dict]:
    """Each named peer's median time (or why it has none) on this problem."""
    results = {}
    for name in names:
        try:
            call, note = PEERS[name](layout, window, q, k, v)
            results[name] = {"ms": median_ms(call), "note": note}
        except Unavailable as why:
            results[name] = {"note": str(why)}
        except Exception as error:  # loaded but failed on this problem (shape, dtype, GPU)
            results[name] = {"note": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    return results
