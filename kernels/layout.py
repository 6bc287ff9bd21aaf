"""Where the tokens of one attention call sit: text tokens, then (or before) an image grid."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLayout:
    """Token order of a sequence: `text_len` text tokens before (or after) the image tokens,
    which are a row-major grid of shape `grid`: (N,), (H, W) or (F, H, W)."""

    text_len: int
    grid: tuple[int, ...]
    text_first: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if not 1 <= len(self.grid) <= 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be (N,), (H, W) or (F, H, W) of positive sizes, got {self.grid}")
        if self.text_len < 0:
            raise ValueError(f"text_len must be >= 0, got {self.text_len}")

    @property
    def image_len(self) -> int:
        return math.prod(self.grid)

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def image_start(self) -> int:
        """Sequence index of the first image token."""
        return self.text_len if self.text_first else 0

    @property
    def text_start(self) -> int:
        """Sequence index of the first text token."""
        return 0 if self.text_first else self.image_len
