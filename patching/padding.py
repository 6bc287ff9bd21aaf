"""Text padding masks in the window path.

HunyuanVideo (and other models with padded prompts) pass an attention mask that only hides the
padding tokens of the prompt from every query. That mask is honoured exactly by dropping the
hidden text keys: the window kernel runs on the tokens every query may see, and the hidden text
positions, which still have queries of their own, attend densely to those tokens. Any other mask
(one that varies over queries, hides image tokens, or biases scores softly) is not a padding
mask: the call then runs in full attention as the host computes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import TokenLayout, Window, window_attention

HIDDEN = -1.0e4  # an additive mask entry at or below this hides its key (exp underflows to 0)


def hidden_text_keys(mask: Tensor | None, layout: TokenLayout, batch: int) -> list[Tensor] | None:
    """Per batch row, the text positions (0 .. text_len-1) the mask hides from every query;
    [] per row when it hides nothing, None when `mask` is not a text padding mask.

    Masks are read as ComfyUI's SDPA backend reads them: [Nq, Nk], [B, Nq, Nk] or [B, H, Nq, Nk],
    bool (True = seen) or additive float, broadcast over what is 1."""
    if mask is None:
        return [torch.empty(0, dtype=torch.long)] * batch
    while mask.ndim < 4:
        mask = mask.unsqueeze(0 if mask.ndim == 2 else 1)
    if mask.ndim != 4 or mask.shape[-1] != layout.seq_len or mask.shape[0] not in (1, batch):
        return None
    seen = mask if mask.dtype == torch.bool else mask == 0
    hidden = ~seen if mask.dtype == torch.bool else mask <= HIDDEN
    if not bool((seen | hidden).all()):
        return None  # soft biases: not a padding mask
    first = seen[:, :1, :1, :]
    if not bool((seen == first).all()):
        return None  # differs between queries or heads
    image = slice(layout.image_start, layout.image_start + layout.image_len)
    if not bool(first[..., image].all()):
        return None  # hides image tokens
    text = first[:, 0, 0, layout.text_start:layout.text_start + layout.text_len]
    rows = [(~row).nonzero().flatten().cpu() for row in text]
    return rows * batch if len(rows) == 1 else rows


def padded_window_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, window: Window,
                            hidden: list[Tensor], *, scale: float | None, backend: str) -> Tensor:
    """Window attention of q, k, v [B, H, N, D] with the given text keys hidden, one batch row at
    a time (each row may hide other text positions)."""
    rows = []
    for row, hidden_row in enumerate(hidden):
        qb, kb, vb = (t[row:row + 1] for t in (q, k, v))
        if hidden_row.numel() == 0:
            rows.append(window_attention(qb, kb, vb, layout, window, backend=backend, scale=scale))
            continue
        hidden_seq = hidden_row.to(q.device) + layout.text_start
        keep = torch.ones(layout.seq_len, dtype=torch.bool, device=q.device)
        keep[hidden_seq] = False
        kept_seq = keep.nonzero().flatten()
        kept_layout = TokenLayout(layout.text_len - hidden_row.numel(), layout.grid, layout.text_first)
        kq, kk, kv = (t[:, :, kept_seq] for t in (qb, kb, vb))
        out = torch.empty_like(qb)
        out[:, :, kept_seq] = window_attention(kq, kk, kv, kept_layout, window, backend=backend, scale=scale)
        out[:, :, hidden_seq] = torch.nn.functional.scaled_dot_product_attention(qb[:, :, hidden_seq], kk, kv,
                                                                                 scale=scale)
        rows.append(out)
    return torch.cat(rows)
