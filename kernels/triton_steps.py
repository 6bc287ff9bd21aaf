"""What the Triton kernels share: loading rows, one key block of the online softmax, the final
normalisation (+ residual) and store, and the launch options every kernel takes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # softmax in base 2: e^x = 2^(x log2 e)


@triton.jit
def load_rows(X, base, rows, row_ok, offs_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `rows` of one head's [tokens, HEAD_DIM] matrix (zeros where not `row_ok`)."""
    x = tl.load(
        X + base + rows[:, None] * HEAD_DIM + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def attend_block(
    q,
    K,
    V,
    kv_base,
    rows,
    row_ok,
    offs_d,
    m_i,
    l_i,
    acc,
    scale,
    allowed,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of keys (sequence rows `rows`) of the online softmax; `allowed` is its
    [queries, keys] mask. m_i is the running maximum of the scores in base 2."""
    k = load_rows(K, kv_base, rows, row_ok, offs_d, HEAD_DIM, UPCAST)
    v = load_rows(V, kv_base, rows, row_ok, offs_d, HEAD_DIM, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)  # base 2: exp2 is one instruction
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def attend_range(
    q,
    K,
    V,
    kv_base,
    start,
    stop,
    offs_d,
    m_i,
    l_i,
    acc,
    scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Keys start .. stop - 1 of the sequence, all seen by every query, in blocks of BLOCK_N."""
    for first in range(start, stop, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        ok = rows < stop
        m_i, l_i, acc = attend_block(
            q, K, V, kv_base, rows, ok, offs_d, m_i, l_i, acc, scale, ok[None, :], HEAD_DIM, UPCAST, PRECISION
        )  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def store_rows(Out, Res, base, rows, row_ok, offs_d, acc, l_i, HEAD_DIM: tl.constexpr, HAS_RES: tl.constexpr):
    """Normalise the softmax, add the residual if any (window + residual in one pass), store."""
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    offsets = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    if HAS_RES:
        acc += tl.load(Res + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + offsets, acc.to(Out.dtype.element_ty), mask=ok)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: "ieee" for float32 unless TF32 is allowed for float32 matmuls
    (torch.set_float32_matmul_precision); other dtypes multiply in their own precision."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def launch_options(q: Tensor, residual: Tensor | None) -> dict:
    """The constexpr arguments every kernel takes."""
    return {
        "HAS_RES": residual is not None,
        # the interpreter multiplies bfloat16 bit patterns in tl.dot (triton issue 11584)
        "UPCAST": triton.knobs.runtime.interpret and q.dtype == torch.bfloat16,
        "PRECISION": input_precision(q.dtype),
        "HEAD_DIM": q.shape[-1],
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
    }
