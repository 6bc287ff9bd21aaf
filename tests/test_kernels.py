"""Window-attention kernels: semantics of the windows, every backend against a dense float64
reference written here from the methods' definitions (not the pack's masks and pooling), FLOP
accounting and input validation. Random inputs come from generators seeded per test (conftest)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import pack_import
from torch import Tensor

kernels = pack_import("kernels")
masks = pack_import("kernels.masks")
TokenLayout, Window = kernels.TokenLayout, kernels.Window

# relative error bound (Frobenius norm) of each precision against the float64 reference
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}

# (grid, window): grids are not multiples of the tiles (64 tokens, 8 x 8, 1 x 8 x 8)
WINDOWS = [
    ((11, 15), Window("band", 20)),
    ((11, 15), Window("circle", 4)),
    ((11, 15), Window("square", 3)),
    ((12, 16), Window("circle", 5, pool=4)),
    ((3, 9, 10), Window("circle", 3, temporal_radius=1)),
    ((3, 8, 10), Window("square", 2, temporal_radius=1, pool=2)),
]
TEXT = [(0, True), (77, True), (77, False), (512, True), (512, False)]


def dense_reference(q: Tensor, k: Tensor, v: Tensor, layout, window, pool_weight: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
    """Window attention straight from the definitions (README and the papers), in float64, sharing
    no code with the pack's masks or pooling: image tokens form a row-major (F,) H, W grid after
    (or before) the text; an image query sees the image keys of its window (band |i - j| <= r over
    the flattened image; circle dy^2 + dx^2 < r^2, cut at the edges; square |dy|, |dx| <= r; and
    |dt| <= temporal radius on video), every text key and, with pooling, every pooled key: the image
    keys / values summed over d x d patches with weight w[py * d + px] for patch position (py, px),
    in row-major (frame, patch row, patch column) order. Text queries see every original key. One
    softmax over all the keys a query sees."""
    q, k, v = (t.double() for t in (q, k, v))
    text, grid = layout.text_len, tuple(layout.grid)
    image_len = math.prod(grid)
    first = text if layout.text_first else 0  # where the image tokens start
    position = torch.arange(text + image_len)
    is_image = (position >= first) & (position < first + image_len)
    i = (position - first).clamp(0, image_len - 1)
    frames, height, width = (1,) * (3 - len(grid)) + grid if len(grid) > 1 else (1, 1, image_len)
    t, y, x = i // (height * width), (i // width) % height, i % width
    dt, dy, dx = (a[:, None] - a[None, :] for a in (t, y, x))
    if window.shape == "band":
        near = (i[:, None] - i[None, :]).abs() <= window.radius
    elif window.shape == "circle":
        near = (dy * dy + dx * dx < window.radius**2) & (dt.abs() <= window.temporal_radius)
    else:
        near = (dy.abs() <= window.radius) & (dx.abs() <= window.radius) & (dt.abs() <= window.temporal_radius)
    allowed = torch.where(is_image[:, None] & is_image[None, :], near, True)
    keys, values = k, v
    if window.pool:
        d = window.pool
        weight = (torch.full((d * d,), 1.0 / d**2) if pool_weight is None else pool_weight).double().reshape(d, d)

        def pooled(z: Tensor) -> Tensor:
            patches = z[:, :, first:first + image_len].reshape(*z.shape[:2], frames, height // d, d, width // d, d, -1)
            return torch.einsum("bnfpqrse,qs->bnfpre", patches, weight).reshape(*z.shape[:2], -1, z.shape[-1])

        keys, values = torch.cat([k, pooled(k)], dim=2), torch.cat([v, pooled(v)], dim=2)
        allowed = torch.cat([allowed, is_image[:, None].expand(-1, keys.shape[2] - k.shape[2])], dim=1)
    scores = (q @ keys.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ values


def random_inputs(layout, batch, heads, dim=16, pool=0, seed=None):
    """Fresh random q, k, v (and pool weights) in float64 from a seeded generator (by default the
    test's own seed, see conftest); the seed is returned for the report."""
    seed = random.randrange(2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    qkv = [
        torch.randn(batch, heads, layout.seq_len, dim, generator=gen, dtype=torch.float64) for _ in range(3)
    ]
    weight = torch.rand(pool * pool, generator=gen, dtype=torch.float64) if pool else None
    return qkv, weight, seed


def rel_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def check_backend(backend, layout, window, batch, heads, dtype, dim=16):
    (q, k, v), weight, seed = random_inputs(layout, batch, heads, dim, window.pool)
    q, k, v = (x.to(dtype) for x in (q, k, v))  # the reference sees the same rounded inputs
    ref = dense_reference(q, k, v, layout, window, pool_weight=weight)
    out = kernels.window_attention(q, k, v, layout, window, backend=backend, pool_weight=weight)
    assert out.shape == q.shape and out.dtype == dtype
    err = rel_error(out, ref)
    assert err < BOUND[dtype], f"{backend} {layout} {window} {dtype}: rel err {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("text_len,text_first", TEXT)
@pytest.mark.parametrize("grid,window", WINDOWS, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cpu_backends_match_reference(backend, grid, window, text_len, text_first, dtype):
    batch, heads = (2, 24) if text_len == 77 else (1, 1)
    check_backend(backend, TokenLayout(text_len, grid, text_first), window, batch, heads, dtype)


@pytest.mark.parametrize("text_len,text_first", [(0, True), (7, True), (7, False)])
@pytest.mark.parametrize("grid,window", WINDOWS, ids=lambda x: str(x))
def test_the_packs_dense_reference_is_the_definition(grid, window, text_len, text_first):
    """kernels.reference_attention (which the runtime's tests use as ground truth) builds its mask
    and pooled keys from the pack's own masks.py and pooling.py: it must equal the definitions."""
    layout = TokenLayout(text_len, grid, text_first)
    (q, k, v), weight, seed = random_inputs(layout, 2, 3, pool=window.pool)
    ours = kernels.reference_attention(q, k, v, layout, window, pool_weight=weight, scale=0.2)
    assert rel_error(ours, dense_reference(q, k, v, layout, window, pool_weight=weight, scale=0.2)) < 1e-12, seed


# FlexAttention compiles once per shape and dtype (seconds each on CPU): a few cases that
# together cover text 0 / 77 / 512, before / after, batch 1 / 2, heads 1 / 24, both dtypes.
FLEX_CASES = [
    (TokenLayout(512, (11, 15), text_first=False), Window("band", 20), 1, 1, torch.float32),
    (TokenLayout(77, (12, 16)), Window("circle", 5, pool=4), 2, 24, torch.bfloat16),
    (TokenLayout(0, (3, 9, 10)), Window("circle", 3, temporal_radius=1), 2, 3, torch.float32),
]


@pytest.mark.parametrize("layout,window,batch,heads,dtype", FLEX_CASES, ids=["band", "circle-pool", "video"])
def test_flex_matches_reference(layout, window, batch, heads, dtype):
    check_backend("flex", layout, window, batch, heads, dtype)


@pytest.mark.parametrize("backend", ["native", "torch", "flex"])
@pytest.mark.parametrize(
    "grid,window",
    [
        ((11, 15), Window("band", 10_000)),
        ((11, 15), Window("circle", 100)),
        ((3, 9, 10), Window("square", 20, temporal_radius=5)),
    ],
    ids=["band", "circle", "square3d"],
)
def test_window_covering_everything_is_full_attention(backend, grid, window):
    layout = TokenLayout(77, grid, text_first=False)
    (q, k, v), _, seed = random_inputs(layout, 2, 3)
    q, k, v = (x.float() for x in (q, k, v))
    out = kernels.window_attention(q, k, v, layout, window, backend=backend)
    assert rel_error(out, F.scaled_dot_product_attention(q, k, v).double()) < 1e-5, f"seed {seed}"


# The Triton interpreter is slow and must be switched on before triton is imported: the cases
# run in a fresh interpreter that imports the kernels package on its own (it needs no ComfyUI) and
# saves each case's inputs and output, checked here against the definitions.
TRITON_SCRIPT = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
from kernels import TokenLayout, Window, window_attention
from kernels.problem import Problem
from kernels.triton_grid import GridConfig
from kernels.triton_kernel import BandConfig
import kernels.triton_kernel as triton_kernel
results = []
for text, grid, first, window, batch, heads, dtype, residual, full, config in json.loads(sys.argv[2]):
    layout, window, dtype = TokenLayout(text, tuple(grid), first), Window(**window), getattr(torch, dtype)
    gen = torch.Generator().manual_seed(len(results))
    q, k, v = (torch.randn(batch, heads, layout.seq_len, 16, generator=gen).to(dtype) for _ in range(3))
    res = torch.randn(q.shape, generator=gen).to(dtype) if residual else None
    if config is None:
        out = window_attention(q, k, v, layout, window, backend="triton", residual=res)
    else:
        config = BandConfig(**config) if "block" in config else GridConfig(**{name: tuple(value) if isinstance(value, list) else value for name, value in config.items()})
        out = triton_kernel.window_attention(Problem(q, k, v, layout, window, residual=res), config)
    results.append((q, k, v, res, out))
torch.save(results, sys.argv[3])
print("done")
"""

TRITON_CASES = [  # text, grid, text first, window, batch, heads, dtype, fused residual, compare with SDPA, config
    (77, (6, 7), False, {"shape": "band", "radius": 9}, 2, 24, "bfloat16", True, False, None),
    (0, (8, 8), True, {"shape": "circle", "radius": 3, "pool": 2}, 1, 1, "float32", False, False, None),
    (
        512,
        (3, 5, 6),
        True,
        {"shape": "square", "radius": 1, "temporal_radius": 1},
        1,
        1,
        "float32",
        True,
        False,
        None,
    ),
    (77, (6, 7), True, {"shape": "circle", "radius": 3}, 2, 1, "float32", False, False, None),
    (5, (6, 7), False, {"shape": "circle", "radius": 100}, 1, 2, "float32", False, True, None),
    (77, (7, 9), True, {"shape": "circle", "radius": 3, "pool": 0}, 1, 2, "float16", True, False, None),
    # the grid-tile kernel (circle, square): boxes cut at odd grid edges, text before / after / none
    (0, (13, 17), True, {"shape": "circle", "radius": 4}, 1, 2, "float32", True, False, None),
    (77, (13, 17), False, {"shape": "square", "radius": 2}, 1, 2, "bfloat16", False, False, None),
    (7, (12, 20), True, {"shape": "circle", "radius": 5, "pool": 4}, 1, 2, "float16", True, False, None),
    (70, (12, 20), False, {"shape": "circle", "radius": 3, "pool": 2}, 1, 1, "float32", False, False, None),
    (33, (3, 7, 9), False, {"shape": "circle", "radius": 3, "temporal_radius": 1}, 1, 2, "bfloat16", True, False, None),
    (130, (2, 8, 10), True, {"shape": "square", "radius": 2, "temporal_radius": 1, "pool": 2}, 1, 1, "float32", True, False, None),
    (0, (4, 9, 11), True, {"shape": "circle", "radius": 9, "temporal_radius": 0}, 1, 1, "float16", False, False, None),
    # other configurations: taller and deeper query boxes than key boxes, larger band blocks
    (77, (13, 17), True, {"shape": "circle", "radius": 4, "pool": 0}, 1, 2, "bfloat16", True, False,
     {"query_box": (1, 16, 8), "key_box": (1, 8, 8), "num_warps": 8}),
    (9, (5, 9, 11), False, {"shape": "circle", "radius": 3, "temporal_radius": 1}, 1, 1, "float32", False, False,
     {"query_box": (2, 4, 8), "key_box": (1, 8, 16)}),
    (20, (7, 9), True, {"shape": "band", "radius": 5}, 1, 1, "float16", True, False, {"block": 128}),
    # tile-major keys: k, v copied into key-box order, boxes padded at odd grid edges, 2D and 3D
    (77, (13, 17), False, {"shape": "circle", "radius": 4}, 1, 2, "bfloat16", True, False,
     {"tile_major_keys": True}),
    (7, (12, 20), True, {"shape": "circle", "radius": 5, "pool": 4}, 1, 1, "float32", False, False,
     {"tile_major_keys": True}),
    (0, (5, 9, 11), True, {"shape": "square", "radius": 2, "temporal_radius": 1}, 1, 1, "float32", True, False,
     {"query_box": (1, 8, 8), "key_box": (2, 4, 4), "num_warps": 4, "tile_major_keys": True}),
]


def test_triton_matches_reference_in_the_interpreter(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be checked")
    repo = Path(kernels.__file__).resolve().parents[1]
    saved = tmp_path / "triton_cases.pt"
    run = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, str(repo), json.dumps(TRITON_CASES), str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(saved)
    for case, (q, k, v, res, out) in zip(TRITON_CASES, results, strict=True):
        text, grid, first, window, _, _, dtype, _, full, _ = case
        assert out.dtype == getattr(torch, dtype) and out.shape == q.shape
        if full:  # a window covering everything is full attention
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        else:
            ref = dense_reference(q, k, v, TokenLayout(text, grid, first), Window(**window))
        ref = ref if res is None else ref + res.double()
        err = rel_error(out, ref)
        assert err < BOUND[out.dtype], f"triton {case}: rel err {err:.2e}"


@pytest.mark.parametrize("query_box,key_box", [((1, 8, 8), (1, 8, 8)), ((2, 4, 4), (1, 16, 8))])
@pytest.mark.parametrize(
    "layout,window",
    [
        (TokenLayout(5, (13, 17)), Window("circle", 4)),
        (TokenLayout(0, (17, 9)), Window("square", 3)),
        (TokenLayout(3, (3, 10, 12), text_first=False), Window("circle", 5, temporal_radius=1)),
        (TokenLayout(0, (4, 9, 11)), Window("square", 1, temporal_radius=2)),
    ],
    ids=["circle", "square", "circle-3d", "square-3d"],
)
def test_grid_boxes_are_classified_as_the_dense_mask_says(layout, window, query_box, key_box):
    """The Triton grid kernel's key boxes per query box, from per-axis gaps, against the mask
    evaluated on every pair of tokens of every pair of boxes: none missed, whole ones first."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be checked")
    grid_kernel = pack_import("kernels.triton_grid")
    lists = grid_kernel.box_lists(layout, window, query_box, key_box)
    image = masks.image_mask(layout, window)
    query_tokens, key_tokens = (_box_tokens(grid_kernel.grid_boxes(layout, box), layout) for box in (query_box, key_box))
    for q, q_tokens in enumerate(query_tokens):
        seen = [image(q_tokens[:, None], k_tokens[None, :]) for k_tokens in key_tokens]
        full = [k for k, pair in enumerate(seen) if bool(pair.all())]
        some = [k for k, pair in enumerate(seen) if bool(pair.any())]
        listed = lists.key_boxes[q, : lists.key_count[q]].tolist()
        assert sorted(listed) == some and sorted(listed[: lists.full_count[q]]) == full


@pytest.mark.parametrize(
    "layout,key_box",
    [(TokenLayout(5, (13, 17)), (1, 8, 8)), (TokenLayout(3, (5, 9, 11), text_first=False), (2, 4, 4))],
    ids=["2d", "3d"],
)
def test_tile_major_order_puts_each_key_box_in_one_block(layout, key_box):
    """Tile-major keys: block b of the copied keys holds key box b's tokens in row-major order,
    then padding slots (past the grid's far edges) that repeat a real key of the box."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be checked")
    grid_kernel = pack_import("kernels.triton_grid")
    slots = grid_kernel.tile_major_order(layout, key_box, torch.device("cpu")).view(-1, math.prod(key_box))
    boxes = _box_tokens(grid_kernel.grid_boxes(layout, key_box), layout)
    assert slots.shape[0] == len(boxes)
    for block, tokens in zip(slots - layout.image_start, boxes, strict=True):
        inside = block[: tokens.numel()] if block.numel() == tokens.numel() else None
        assert torch.equal(block.unique(), tokens)  # every key of the box, nothing else
        assert inside is None or torch.equal(inside, tokens)  # a whole box: exactly in order


def _box_tokens(boxes, layout: TokenLayout) -> list[Tensor]:
    """The flattened image indices of each box (the boxes' first and last coordinates as listed)."""
    dims, tokens = len(layout.grid), []
    for box in range(boxes.first[0].numel()):
        axes = [torch.arange(boxes.first[a][box], boxes.last[a][box] + 1) for a in range(3 - dims, 3)]
        index = torch.zeros((), dtype=torch.long)
        for axis, size in zip(axes, layout.grid, strict=True):
            index = index[..., None] * size + axis
        tokens.append(index.reshape(-1))
    return tokens


# The interpreter runs the kernels as numpy without Triton's type checks; this compiles them for a
# Hopper GPU (sm_90, no GPU needed: Triton ships ptxas) as a launch on one would.
COMPILE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_grid, triton_kernel

def compile_for_hopper(kernel, pointers, dtype, scalars, constants, tensors=5):
    # pointers: the first `tensors` point at `dtype` data, the others at int32 lists
    types = {**{name: "*" + dtype for name in pointers[:tensors]}, **{name: "*i32" for name in pointers[tensors:]}}
    types.update({name: "fp32" if name == "scale" else "i32" for name in scalars})
    types.update({name: "constexpr" for name in constants})
    signature = {name: types[name] for name in kernel.arg_names}  # in the kernel's order
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
    source = ASTSource(kernel, signature, constexprs)
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm

common = dict(UPCAST=False, HEAD_DIM=128, BLOCK_D=128)
for tiled in (False, True):  # keys gathered through index maps, and tile-major keys
    compile_for_hopper(
        triton_grid._grid_kernel,
        ["Q", "K", "V", "Out", "Res", "KT", "VT", "key_count", "full_count", "key_boxes"], "bf16",
        ["max_keys", "seq_len", "kv_len", "tile_rows", "scale"],
        dict(common, HAS_RES=True, TILED=tiled, PRECISION="tf32", QBOX_T=1, QBOX_H=16, QBOX_W=8, Q_ROWS=8,
             Q_COLUMNS=16, KBOX_T=1, KBOX_H=8, KBOX_W=8, K_ROWS=16, K_COLUMNS=16, BLOCK_M=128, BLOCK_N=64,
             IMAGE_START=512, TEXT_START=0, TEXT_LEN=512, FRAMES=1, GRID_H=128, GRID_W=128, CIRCLE=True, RADIUS=16,
             T_RADIUS=0),
        tensors=7,
    )
compile_for_hopper(
    triton_kernel._band_kernel, ["Q", "K", "V", "Out", "Res", "partial_count", "partial_index", "full_count",
    "full_index"], "fp32", ["seq_len", "kv_len", "kv_blocks", "scale"],
    dict(common, HAS_RES=False, PRECISION="ieee", BLOCK_M=64, IMAGE_START=512, IMAGE_LEN=4096, RADIUS=512),
)
print("compiled")
"""


def test_triton_kernels_compile_for_a_gpu():
    """Both Triton kernels pass Triton's compiler for sm_90 (bfloat16 grid kernel with text, its
    keys gathered and tile-major; float32 band kernel in IEEE precision): the type errors the
    interpreter cannot see."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be checked")
    repo = Path(kernels.__file__).resolve().parents[1]
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}  # compile, not
    run = subprocess.run(  # interpret, whatever the test run's own environment says
        [sys.executable, "-c", COMPILE_SCRIPT, str(repo)], capture_output=True, text=True, timeout=600, env=environment
    )
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


def test_triton_float32_is_full_precision_unless_tf32_is_allowed():
    """The interpreter ignores tl.dot's input precision, so the choice itself is checked: float32
    is multiplied in IEEE float32 (not TF32) unless the user allows TF32 for float32 matmuls."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be checked")
    precision = pack_import("kernels.triton_steps").input_precision
    assert torch.get_float32_matmul_precision() == "highest"
    assert precision(torch.float32) == "ieee"
    torch.set_float32_matmul_precision("high")
    try:
        assert precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "plain-math"])
@pytest.mark.parametrize("text_len,text_first", [(0, True), (77, False), (512, True)])
def test_band_interior_tiles_run_as_one_batched_call(monkeypatch, text_len, text_first, fused):
    """A long band has runs of identical interior tiles, computed in one call over overlapping
    strided views; the result still matches the reference (also the off-CPU math path)."""
    torch_tiles = pack_import("kernels.torch_tiles")
    layout, window = TokenLayout(text_len, (9, 70), text_first=text_first), Window("band", 50)
    runs = [run.count for run in torch_tiles.plan_for(layout, window).runs]
    assert max(runs) == pack_import("kernels.tiles").RUN_TOKENS // 64 > 1 and sum(runs) == -(-630 // 64)
    real_attend = torch_tiles.attend
    monkeypatch.setattr(torch_tiles, "attend", lambda *a, **kw: real_attend(*a, **kw, fused=fused))
    check_backend("torch", layout, window, 2, 3, torch.float32)


@pytest.mark.parametrize(
    "layout,window,tile",
    [
        (TokenLayout(5, (29, 31)), Window("circle", 6), (8, 8)),
        (TokenLayout(0, (5, 13, 11)), Window("square", 2, temporal_radius=1), (1, 8, 8)),
        (TokenLayout(3, (300,)), Window("band", 40), (64,)),
        (TokenLayout(0, (40, 44)), Window("circle", 14), (8, 8)),  # keys in interleaved parts
    ],
    ids=["circle", "square-3d", "band", "parts"],
)
def test_every_tile_holds_exactly_its_queries_window(layout, window, tile):
    """Tile plans evaluate the mask once per tile geometry and shift it to its translates: each
    tile's keys are exactly the keys its queries see, and its mask (whole and per part) is the
    dense mask on them."""
    tiles = pack_import("kernels.tiles")
    plan = tiles.tile_plan(layout, window, tile)
    image = masks.image_mask(layout, window)
    covered = []
    for run in plan.runs:
        step = 0 if run.count == 1 else run.first.query_span[1] - run.first.query_span[0]
        for i in range(run.count):
            queries, keys = run.first.queries + i * step, run.first.keys + i * step
            covered.append(queries)
            seen = image(queries[:, None], torch.arange(layout.image_len)[None, :])
            assert torch.equal(keys, torch.nonzero(seen.any(dim=0)).flatten())
            for part in run.first.parts:
                part_keys = part.keys + i * step
                expected = image(queries[:, None], part_keys[None, :])
                assert bool(expected.all()) if part.mask is None else torch.equal(plan.masks[part.mask], expected)
    assert torch.equal(torch.cat(covered).sort().values, torch.arange(layout.image_len))


@pytest.fixture
def small_gather_budget(monkeypatch):
    """GATHER_KEYS at 512, with the cached tile plans rebuilt under it (and again after)."""
    tiles = pack_import("kernels.tiles")
    monkeypatch.setattr(tiles, "GATHER_KEYS", 512)
    tiles.tile_plan.cache_clear()
    yield tiles
    tiles.tile_plan.cache_clear()


@pytest.mark.parametrize("text_len,text_first", [(0, True), (77, False)])
def test_large_gathered_key_sets_split_into_interleaved_parts(small_gather_budget, text_len, text_first):
    """A 2D tile whose keys exceed GATHER_KEYS attends to them in interleaved parts merged by
    log-sum-exp (so its gather buffers stay small); where a part would leave a query without
    keys (a 1-token circle seen across frames), the keys stay whole. Both match the reference."""
    tiles = small_gather_budget
    split = (TokenLayout(text_len, (40, 44), text_first), Window("circle", 14, pool=4))
    whole = (TokenLayout(text_len, (12, 16, 16), text_first), Window("circle", 1, temporal_radius=5))
    for (layout, window), expect_split in ((split, True), (whole, False)):
        plan = pack_import("kernels.torch_tiles").plan_for(layout, window)
        lone = [run.first for run in plan.runs if run.first.key_span is None]
        assert max(t.keys.numel() for t in lone) > tiles.GATHER_KEYS
        assert max(len(t.parts) for t in lone) > 1 if expect_split else all(len(t.parts) == 1 for t in lone)
        for tile in lone:
            assert torch.equal(torch.cat([p.keys for p in tile.parts]).sort().values, tile.keys)
        check_backend("torch", layout, window, 1, 2, torch.float32)


@pytest.mark.parametrize(
    "layout,window",
    [
        (TokenLayout(77, (12, 16)), Window("circle", 5, pool=4)),  # 3 pooled rows of 4: parts of 2 + 1 rows
        (TokenLayout(0, (3, 8, 10), text_first=False), Window("square", 2, temporal_radius=1, pool=2)),
    ],
    ids=["2d-text", "video-no-text"],
)
def test_pooled_keys_made_and_attended_in_parts(monkeypatch, layout, window):
    """Pooled keys are made a few pooled rows at a time (across frames on video) and merged
    by log-sum-exp; the parts together are the pooled set, and the result matches the reference."""
    torch_tiles = pack_import("kernels.torch_tiles")
    monkeypatch.setattr(torch_tiles, "POOLED_KEYS", 2 * layout.grid[-1] // window.pool)
    k = torch.randn(1, 2, layout.seq_len, 8)
    sets = list(torch_tiles._shared_key_sets(k, k, layout, window, None))
    pooled = [keys for keys, _ in sets[1 if layout.text_len else 0 :]]
    assert len(pooled) == -(-layout.image_len // window.pool**2 // torch_tiles.POOLED_KEYS) > 1
    whole = pack_import("kernels.pooling").pool_tokens(k, layout, window, None)
    assert torch.allclose(torch.cat(pooled, dim=2), whole)
    check_backend("torch", layout, window, 2, 3, torch.float32)


def test_head_chunks_on_worker_threads(monkeypatch):
    """A tiny scratch budget forces one head per pass, spread over two worker threads; the
    result is unchanged and the caller's intra-op thread count is restored."""
    monkeypatch.setattr(pack_import("kernels.torch_tiles"), "SCRATCH_BYTES", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layout = TokenLayout(77, (11, 15), text_first=False)
        check_backend("torch", layout, Window("circle", 4), 2, 5, torch.float32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_worker_threads_run_under_the_callers_inference_mode(monkeypatch, backend):
    """ComfyUI samples under torch.inference_mode(); the worker threads must too, or writing
    into the output (an inference tensor) fails."""
    monkeypatch.setattr(pack_import("kernels.torch_tiles"), "SCRATCH_BYTES", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            check_backend(backend, TokenLayout(16, (8, 8)), Window("band", 9), 1, 4, torch.float32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_native_tiles_pack_short_key_runs_and_resume_over_pooled_parts(monkeypatch):
    """The native kernel reads a 2D tile's keys as dozens of short runs (one per grid row),
    packed into blocks of 512 keys (so one run can straddle two blocks), then the text; pooled
    keys come in several calls, each resuming the rows' softmax. All match the reference."""
    native = pack_import("kernels.native")
    layout, window = TokenLayout(77, (40, 44), text_first=False), Window("circle", 14, pool=4)
    monkeypatch.setattr(native, "POOLED_KEYS", 2 * layout.grid[-1] // window.pool)  # 5 parts
    plan = native.span_plan(layout, window)
    runs_per_tile = plan.key_offsets.diff()
    lengths = plan.key_runs[:, 1]
    widest = int(runs_per_tile.argmax())
    tile_runs = lengths[plan.key_offsets[widest] : plan.key_offsets[widest + 1]]
    assert tile_runs[:-1].max() < 128 and tile_runs[:-1].sum() > 512  # short image runs over > 1 block
    assert tile_runs[-1] == 77 and plan.key_runs[plan.key_offsets[widest + 1] - 1, 0] == layout.image_len
    check_backend("native", layout, window, 2, 3, torch.float32)


def test_native_backend_refuses_other_devices():
    layout = TokenLayout(4, (4, 4))
    q = torch.randn(1, 1, layout.seq_len, 8, device="meta")
    with pytest.raises(ValueError, match="native backend runs on CPU only"):
        kernels.window_attention(q, q, q, layout, Window("band", 2), backend="native")


@pytest.mark.parametrize("masked", [False, True])
def test_unfused_attend_matches_the_fused_kernel(masked):
    """The torch backend's plain-math path (used off CPU) against ATen's CPU flash kernel."""
    attend = pack_import("kernels.torch_tiles").attend
    q, k, v = (torch.randn(1, 3, n, 16) for n in (20, 33, 33))
    mask = torch.zeros(20, 33).masked_fill_(torch.rand(20, 33) > 0.6, float("-inf")) if masked else None
    if mask is not None:
        mask[:, 0] = 0.0  # every query sees at least one key
    fused, unfused = attend(q, k, v, mask, 0.3, fused=True), attend(q, k, v, mask, 0.3, fused=False)
    assert torch.allclose(fused[0], unfused[0], atol=1e-5) and torch.allclose(fused[1], unfused[1], atol=1e-5)


def test_residual_is_added():
    layout, window = TokenLayout(77, (11, 15)), Window("circle", 4)
    (q, k, v), _, _ = random_inputs(layout, 1, 2)
    residual = torch.randn_like(q)
    plain = kernels.window_attention(q, k, v, layout, window)
    assert torch.allclose(
        kernels.window_attention(q, k, v, layout, window, residual=residual), plain + residual
    )


def test_scale_is_used():
    layout, window = TokenLayout(7, (11, 15)), Window("square", 2)
    (q, k, v), _, _ = random_inputs(layout, 1, 2)
    ref = dense_reference(q, k, v, layout, window, scale=0.3)
    assert rel_error(kernels.window_attention(q, k, v, layout, window, scale=0.3), ref) < 1e-6


# --- semantics of the windows (hand-checked facts, not the implementation) ---


def image_neighbours(layout, window, query):
    """Image indices the image query `query` sees, from the sequence mask."""
    keys = torch.arange(layout.seq_len + window.pooled_len(layout))
    seen = masks.sequence_mask(layout, window)(torch.tensor(layout.image_start + query), keys)
    image = keys[seen] - layout.image_start
    return set(image[(image >= 0) & (image < layout.image_len)].tolist())


def test_circle_is_strict_and_cut_at_the_edges():
    layout = TokenLayout(0, (10, 10))
    centre = image_neighbours(layout, Window("circle", 2), 5 * 10 + 5)
    # dy^2 + dx^2 < 4: the plus shape of radius 1 and the diagonals (1 + 1 = 2 < 4); not (0, 2)
    assert centre == {(5 + dy) * 10 + 5 + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    corner = image_neighbours(layout, Window("circle", 2), 0)
    assert corner == {0, 1, 10, 11}  # cut, not shifted inward


def test_square_band_and_temporal_radius():
    layout = TokenLayout(0, (10, 10))
    assert len(image_neighbours(layout, Window("square", 2), 55)) == 25
    assert image_neighbours(layout, Window("band", 3), 1) == {0, 1, 2, 3, 4}  # symmetric, clipped
    video = TokenLayout(0, (5, 4, 4))
    seen = image_neighbours(video, Window("square", 0, temporal_radius=1), 2 * 16 + 5)
    assert seen == {16 + 5, 2 * 16 + 5, 3 * 16 + 5}


@pytest.mark.parametrize("text_first", [True, False])
def test_text_and_pooled_keys(text_first):
    layout, window = TokenLayout(3, (4, 4), text_first), Window("circle", 1, pool=2)
    n, pooled = layout.seq_len, window.pooled_len(layout)
    dense = masks.sequence_mask(layout, window)(torch.arange(n)[:, None], torch.arange(n + pooled)[None, :])
    text = torch.arange(layout.text_start, layout.text_start + 3)
    image = torch.arange(layout.image_start, layout.image_start + 16)
    assert dense[text, :n].all() and not dense[text, n:].any()  # text sees all originals, no pooled
    assert dense[image][:, text].all() and dense[image, n:].all()  # image sees text and pooled
    assert dense[image][:, image].equal(torch.eye(16, dtype=torch.bool))  # radius 1: itself only


# --- FLOPs ---


@pytest.mark.parametrize("grid,window", WINDOWS, ids=lambda x: str(x))
def test_flops_count_the_exact_mask(grid, window):
    layout = TokenLayout(77, grid, text_first=False)
    flops = kernels.attention_flops(layout, window, batch=2, heads=3, head_dim=16)
    n = layout.seq_len
    keys = torch.arange(n + window.pooled_len(layout))
    kept = int(masks.sequence_mask(layout, window)(torch.arange(n)[:, None], keys[None, :]).sum())
    per_pair = 4 * 16 * 2 * 3
    assert flops.full == per_pair * n * n
    assert flops.mask == per_pair * kept
    assert flops.mask <= flops.computed


def test_flops_fall_with_the_window():
    layout = TokenLayout(512, (64, 64))
    small, large = (
        kernels.attention_flops(layout, Window("circle", r), batch=1, heads=24, head_dim=128) for r in (8, 32)
    )
    assert small.computed < large.computed < large.full


# --- validation ---


def test_validation_messages():
    layout = TokenLayout(4, (8, 8))
    q = torch.randn(1, 2, layout.seq_len, 8)
    with pytest.raises(ValueError, match="tokens but the layout has"):
        kernels.window_attention(q[:, :, 1:], q[:, :, 1:], q[:, :, 1:], layout, Window("band", 2))
    with pytest.raises(ValueError, match="radius must be >= 1"):
        Window("circle", 0)
    with pytest.raises(ValueError, match="shape must be one of"):
        Window("diamond", 2)
    with pytest.raises(ValueError, match="must divide the image height and width"):
        kernels.window_attention(q, q, q, layout, Window("circle", 2, pool=3))
    with pytest.raises(ValueError, match="needs an \\(H, W\\)"):
        kernels.window_attention(
            torch.randn(1, 1, 68, 8),
            *[torch.randn(1, 1, 68, 8)] * 2,
            TokenLayout(4, (64,)),
            Window("circle", 2),
        )
    with pytest.raises(ValueError, match="temporal_radius applies only"):
        kernels.window_attention(q, q, q, layout, Window("square", 2, temporal_radius=1))
    with pytest.raises(ValueError, match="pool\\*pool = 4"):
        kernels.window_attention(q, q, q, layout, Window("circle", 2, pool=2), pool_weight=torch.ones(3))
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'.*torch"):
        kernels.window_attention(q, q, q, layout, Window("band", 2), backend="cuda-magic")
    with pytest.raises(ValueError, match="residual must have q's shape"):
        kernels.window_attention(q, q, q, layout, Window("band", 2), residual=q[:, :1])


def test_available_backends_and_auto_choice(monkeypatch):
    pack_import("kernels.native").build_in_background().join()  # started when the pack loaded
    assert {"native", "torch"} <= set(kernels.available_backends())
    backends = pack_import("kernels.backends")
    choose = backends.choose_backend
    assert choose("auto", torch.device("cpu")) == "native"
    monkeypatch.setattr(backends, "_failed_launch", lambda name, device_type: None)  # as on a working GPU
    backends._device_backend.cache_clear()
    assert choose("auto", torch.device("cuda")) == ("triton" if importlib.util.find_spec("triton") else "torch")
    backends._device_backend.cache_clear()
    monkeypatch.setattr(pack_import("kernels.native"), "available", lambda: False)  # no C++ compiler
    assert choose("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend 'native' cannot run here"):
        choose("native", torch.device("cpu"))


AUTO_ON_GPU_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from kernels.backends import BACKENDS, choose_backend
print(choose_backend("auto", torch.device("cuda")), "kernels.native" in sys.modules)
"""


def test_auto_on_a_gpu_neither_builds_nor_imports_the_native_kernel():
    """In a fresh interpreter (nothing imported yet): choosing for a CUDA device leaves the CPU
    kernel alone; with no CUDA device here nothing launches there, so it picks the torch tiles
    (Triton on a machine where Triton runs on the GPU)."""
    repo = Path(kernels.__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", AUTO_ON_GPU_SCRIPT, str(repo)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    chosen, imported = run.stdout.split()
    expected = "triton" if torch.cuda.is_available() and importlib.util.find_spec("triton") else "torch"
    assert chosen == expected and imported == "False"


@pytest.fixture
def simulated_gpu(monkeypatch):
    """The auto choice as on a GPU machine, decided afresh; the native kernel must not be consulted."""
    backends, native = pack_import("kernels.backends"), pack_import("kernels.native")

    def never() -> bool:
        raise AssertionError("the native kernel was consulted for a GPU")

    monkeypatch.setattr(native, "available", never)
    monkeypatch.setattr(native, "building", never)
    backends._device_backend.cache_clear()
    yield backends
    backends._device_backend.cache_clear()


@pytest.mark.parametrize("device", ["cuda", "mps", "xpu"])
def test_a_gpu_without_triton_runs_the_torch_tiles_said_once_in_the_log(simulated_gpu, monkeypatch, caplog, device):
    """No Triton (ComfyUI's Windows portable build; Apple MPS): neither the Triton kernel nor a
    compiled FlexAttention can run, so "auto" picks the torch tiles up front, says so once, and
    they compute the reference's result."""
    backends = simulated_gpu
    monkeypatch.setattr(backends, "_importable", lambda needs: needs != "triton")
    launched = []
    monkeypatch.setattr(backends, "_failed_launch", lambda name, device_type: launched.append(name) or "no device")
    with caplog.at_level("INFO", logger=backends.log.name):
        chosen = {backends.choose_backend("auto", torch.device(device)) for _ in range(3)}
    assert chosen == {"torch"}
    said = [r.getMessage() for r in caplog.records if "window attention on" in r.getMessage()]
    assert len(said) == 1 and "torch tiles" in said[0] and "Triton is not installed" in said[0]
    assert launched == ([] if device in backends.TRITON_DEVICES else ["flex"])  # MPS: flex tried, fails here
    layout, window = TokenLayout(77, (11, 15)), Window("circle", 4)
    (q, k, v), _, _ = random_inputs(layout, 2, 3)
    problem = pack_import("kernels.problem").Problem(q.float(), k.float(), v.float(), layout, window)
    out = backends.backend_module("torch").window_attention(problem)
    assert rel_error(out, kernels.reference_attention(q, k, v, layout, window)) < BOUND[torch.float32]


def test_a_gpu_whose_triton_fails_to_launch_falls_back_up_front(simulated_gpu, monkeypatch, caplog):
    """Triton installed but broken (no C compiler, a GPU it does not support): the launch check
    finds it before the first window; compiled FlexAttention fails the same way; the torch tiles run.
    A backend that runs but gives wrong results is refused too."""
    backends = simulated_gpu

    class Broken:
        @staticmethod
        def window_attention(problem):
            raise RuntimeError("Failed to find C compiler")

    class Wrong:
        @staticmethod
        def window_attention(problem):
            return torch.zeros_like(problem.q)

    real_module = backends.backend_module
    monkeypatch.setattr(backends, "_importable", lambda needs: True)
    monkeypatch.setattr(backends, "TRITON_DEVICES", ("meta",))  # a device type this machine can allocate on
    monkeypatch.setattr(backends, "backend_module", lambda name: Broken if name in ("triton", "flex") else
                        real_module(name))
    with caplog.at_level("INFO", logger=backends.log.name):
        assert backends.choose_backend("auto", torch.device("meta")) == "torch"
    (said,) = [r.getMessage() for r in caplog.records if "window attention on" in r.getMessage()]
    assert "triton failed on meta: RuntimeError: Failed to find C compiler" in said and "flex failed" in said
    monkeypatch.setattr(backends, "backend_module", lambda name: Wrong)
    assert backends._failed_launch("triton", "cpu") == "triton gave wrong results on cpu"
    monkeypatch.setattr(backends, "backend_module", real_module)
    assert backends._failed_launch("torch", "cpu") is None


def test_calls_during_the_background_build_use_the_torch_tiles(monkeypatch):
    """While the native kernel builds (here a build held until released), "auto" on CPU runs the
    torch tiles at once, with the torch backend's result; once built, the native kernel."""
    native, torch_tiles = pack_import("kernels.native"), pack_import("kernels.torch_tiles")
    native.build_in_background().join()  # the pack's own build, started when it loaded
    built = native.extension()
    release = threading.Event()

    def held_build():
        assert release.wait(60), "the test never released the build"
        return built

    monkeypatch.setattr(native, "extension", held_build)
    monkeypatch.setattr(native, "_state", native.BuildState())  # as in a fresh process
    monkeypatch.setattr(native, "_background", [])
    used = []
    for module in (native, torch_tiles):
        monkeypatch.setattr(module, "window_attention", _recording(module, used))
    layout, window = TokenLayout(77, (11, 15)), Window("circle", 4)
    (q, k, v), _, _ = random_inputs(layout, 1, 3)
    q, k, v = (x.float() for x in (q, k, v))
    ref = dense_reference(q, k, v, layout, window)

    build = native.build_in_background()
    assert native.building()
    during = kernels.window_attention(q, k, v, layout, window)
    assert used == ["torch_tiles"] and native.building()
    assert torch.equal(during, kernels.window_attention(q, k, v, layout, window, backend="torch"))
    release.set()
    build.join(60)
    assert not native.building() and native.available()
    after = kernels.window_attention(q, k, v, layout, window)
    assert used[-1] == "native"
    assert rel_error(during, ref) < 1e-5 and rel_error(after, ref) < 1e-5


def test_a_failed_native_build_is_tried_again_later(monkeypatch):
    """A build that fails (here once, as when another process holds torch's build lock) leaves
    "auto" on the torch tiles, without retrying at every call; RETRY_AFTER_S later a background
    build tries again, and once it loads "auto" uses the native kernel."""
    native, backends = pack_import("kernels.native"), pack_import("kernels.backends")
    native.build_in_background().join()  # the pack's own build, started when it loaded
    built = native.extension()
    attempts = []

    def flaky_build():
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise RuntimeError("the build lock is held by another process")
        return built

    now = [1000.0]
    monkeypatch.setattr(native, "extension", flaky_build)
    monkeypatch.setattr(native, "_state", native.BuildState())
    monkeypatch.setattr(native, "_background", [])
    monkeypatch.setattr(native, "_clock", lambda: now[0])
    assert backends.choose_backend("auto", torch.device("cpu")) == "torch" and attempts == [0]
    now[0] += native.RETRY_AFTER_S / 2
    assert not native.available() and attempts == [0]  # not at every call
    now[0] += native.RETRY_AFTER_S / 2
    assert not native.available()  # the retry runs in the background: no caller waits for it
    native._background[-1].join(60)
    assert attempts == [0, 1] and native.available()
    assert backends.choose_backend("auto", torch.device("cpu")) == "native"


def _recording(module, used):
    real = module.window_attention

    def window_attention(problem):
        used.append(module.__name__.rsplit(".", 1)[-1])
        return real(problem)

    return window_attention


def test_flex_past_its_shape_limit_hands_new_shapes_to_the_torch_tiles(monkeypatch, caplog):
    """torch.compile recompiles flex for every shape and, past its recompile limit, would run it
    eagerly (the full score matrix). FLEX_SHAPES (64; here 1, then 2) sets that limit for flex's
    calls, and a shape past it runs on the torch tiles (Triton on a GPU) with a log line."""
    flex, torch_tiles = pack_import("kernels.flex"), pack_import("kernels.torch_tiles")
    torch._dynamo.reset()  # no compiled shapes from earlier tests
    flex._announce_fallback.cache_clear()
    monkeypatch.setattr(flex, "FLEX_SHAPES", 1)
    used = []
    monkeypatch.setattr(torch_tiles, "window_attention", _recording(torch_tiles, used))
    window = Window("circle", 2)
    first, second = TokenLayout(3, (4, 5)), TokenLayout(3, (5, 5))
    check_backend("flex", first, window, 1, 1, torch.float32)
    assert used == []
    with caplog.at_level("WARNING"):
        check_backend("flex", second, window, 1, 1, torch.float32)
    assert used == ["torch_tiles"] and "FlexAttention has compiled 1 shapes" in caplog.text
    check_backend("flex", first, window, 1, 1, torch.float32)  # compiled before: still flex
    monkeypatch.setattr(flex, "FLEX_SHAPES", 2)
    check_backend("flex", second, window, 1, 1, torch.float32)
    assert used == ["torch_tiles"]


def dense_block_classes(layout, window, block):
    """Per query block, the key blocks with some / every pair in the dense mask (the definition)."""
    keys = layout.seq_len + window.pooled_len(layout)
    seen = masks.sequence_mask(layout, window)(torch.arange(layout.seq_len)[:, None], torch.arange(keys)[None, :])
    partial, full = [], []
    for rows in seen.split(block, dim=0):
        pairs = list(enumerate(rows.split(block, dim=1)))
        full.append([j for j, pair in pairs if pair.shape[1] == block and bool(pair.all())])
        partial.append([j for j, pair in pairs if bool(pair.any()) and j not in full[-1]])
    return partial, full


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("text_len,text_first", [(0, True), (77, False), (130, True)])
@pytest.mark.parametrize(
    "grid,window",
    [*WINDOWS, ((11, 15), Window("band", 10_000)), ((11, 15), Window("circle", 100)), ((9, 40), Window("circle", 9))],
    ids=lambda x: str(x),
)
def test_block_map_from_key_intervals_matches_the_dense_mask(grid, window, text_len, text_first, block):
    """The block map is built from per-row key intervals, never the dense mask: it must classify
    every (query block, key block) pair as the dense mask does, in ascending key-block order."""
    layout = TokenLayout(text_len, grid, text_first)
    blocks = pack_import("kernels.blocks").block_map(layout, window, block)
    partial, full = dense_block_classes(layout, window, block)
    assert [row[:n].tolist() for row, n in zip(blocks.partial_index, blocks.partial_count, strict=True)] == partial
    assert [row[:n].tolist() for row, n in zip(blocks.full_index, blocks.full_count, strict=True)] == full


def test_gpu_benchmark_script_runs_in_smoke_mode():
    """tests/benchmarks/bench_gpu.py is run on GPUs only when one is at hand: its --smoke mode
    (CPU, tiny shapes, Triton interpreted) keeps the script itself working in CI."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be checked")
    script = Path(kernels.__file__).resolve().parents[1] / "tests" / "benchmarks" / "bench_gpu.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-flex"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| triton | 77 text + (13, 17), circle r4 | float32 |" in run.stdout
    assert "| triton tile-major | 77 text + (13, 17), circle r4 | bfloat16 |" in run.stdout
    assert "0 correctness failures" in run.stdout
    # tile-major keys timed at both shapes: a time (x SDPA) and its share of the bound
    table = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| smoke:") and line.count("|") == 17]
    assert len(table) == 2 and all(cells[8].strip().endswith("x)") and cells[9].strip().endswith("%") for cells in table)
    # every other library either ran or says why not
    for peer in ("flash-attn", "natten", "comfy-kitchen na", "comfy-kitchen sol-attn", "st-attn"):
        line = next(line for line in run.stdout.splitlines() if line.startswith(f"| smoke: 3 x 8 x 8, square 2 x 2 x 1 | {peer} |"))
        assert " ms" in line or "did not load: " in line or "does not apply: " in line, line
