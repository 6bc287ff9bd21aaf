"""A tiny caption encoder producing what a DiT's conditioning holds: context tokens
[B, T, C] (`cross_attn`) and a pooled vector [B, P] (`pooled_output`, for models that take one).
The context is projected to the width the model's text embedding reads (Wan's stock loader
fixes it at umT5's 4096).

Captions are padded to a fixed length so a prompt and an empty negative prompt batch
together under CFG; the empty caption (all padding) is the unconditional input the model
was trained with. A word outside the vocabulary is an error naming the vocabulary: the
model has never seen it, and silently dropping it would produce an image that ignores part
of the prompt with no hint why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

PAD = "<pad>"


class DemoTextEncoder(nn.Module):
    """Word embeddings + learned positions -> small transformer -> (context, pooled)."""

    def __init__(
        self, vocabulary: list[str], width: int = 128, layers: int = 2, heads: int = 4,
        length: int = 16, pooled_width: int | None = 128, context_width: int | None = None,
    ) -> None:
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.config = {"width": width, "layers": layers, "heads": heads, "length": length,
                       "pooled_width": pooled_width, "context_width": context_width}
        self.length = length
        self.token_ids = {w: i + 1 for i, w in enumerate(self.vocabulary)}  # 0 is padding
        self.embed = nn.Embedding(len(self.vocabulary) + 1, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pool = None if pooled_width is None else nn.Sequential(
            nn.Linear(width, pooled_width), nn.SiLU(), nn.Linear(pooled_width, pooled_width))
        self.project = nn.Identity() if context_width in (None, width) else nn.Linear(width, context_width)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> token ids [B, length]; case and punctuation are ignored."""
        rows = []
        for caption in captions:
            words = re.sub(r"[^\w\s]", " ", caption.lower()).split()
            unknown = sorted({w for w in words if w not in self.token_ids})
            if unknown:
                raise ValueError(
                    f"The FastAttn demo model does not know the word(s) {', '.join(unknown)}. "
                    f"Its whole vocabulary is: {' '.join(self.vocabulary)}."
                )
            if len(words) > self.length:
                raise ValueError(f"Caption has {len(words)} words; the demo model reads at most {self.length}.")
            ids = [self.token_ids[w] for w in words]
            rows.append(ids + [0] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.encoder(self.embed(tokens) + self.position)
        context = self.norm(hidden)
        return self.project(context), None if self.pool is None else self.pool(context.mean(dim=1))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self(self.tokenize(captions))

    @torch.no_grad()
    def conditioning(self, caption: str) -> list:
        """ComfyUI's CONDITIONING for one caption (with the pooled vector where this encoder has one)."""
        context, pooled = self.encode([caption])
        return [[context, {} if pooled is None else {"pooled_output": pooled}]]

    def save(self, path: Path) -> None:
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        metadata = {"vocabulary": json.dumps(self.vocabulary), "config": json.dumps(self.config)}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> DemoTextEncoder:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        model = cls(json.loads(metadata["vocabulary"]), **json.loads(metadata["config"]))
        model.load_state_dict(load_file(str(path)))
        return model.eval()
