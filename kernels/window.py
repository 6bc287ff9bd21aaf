"""The window specification: which image keys an image query sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .layout import TokenLayout

SHAPES = ("band", "circle", "square")


@dataclass(frozen=True)
class Window:
    """A local window over the image tokens.

    band:   |i - j| <= radius over the flattened image tokens, whatever the grid (DiTFastAttn).
    circle: dy^2 + dx^2 < radius^2 on the (H, W) grid, cut at the edges (CLEAR).
    square: |dy| <= radius and |dx| <= radius.
    circle and square on a (F, H, W) grid also need |dt| <= temporal_radius.
    pool > 0 appends image keys/values pooled over pool x pool patches (CLEAR's down-sampled
    branch), seen by every image query.
    """

    shape: Literal["band", "circle", "square"]
    radius: int
    temporal_radius: int = 0
    pool: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"window shape must be one of {SHAPES}, got {self.shape!r}")
        smallest = 1 if self.shape == "circle" else 0
        if self.radius < smallest:
            raise ValueError(
                f"{self.shape} radius must be >= {smallest} (a circle of radius 0 holds no token), "
                f"got {self.radius}"
            )
        if self.temporal_radius < 0:
            raise ValueError(f"temporal_radius must be >= 0, got {self.temporal_radius}")
        if self.pool < 0 or self.pool == 1:
            raise ValueError(f"pool must be 0 (off) or a patch size >= 2, got {self.pool}")

    def check(self, layout: TokenLayout) -> None:
        """Raise a ValueError if this window cannot apply to `layout`."""
        dims = len(layout.grid)
        if self.shape != "band" and dims == 1:
            raise ValueError(
                f"a {self.shape} window needs an (H, W) or (F, H, W) grid, got {layout.grid}; "
                "use shape='band' for a 1D sequence"
            )
        if self.temporal_radius and (self.shape == "band" or dims != 3):
            raise ValueError(
                "temporal_radius applies only to circle/square windows on an (F, H, W) grid, "
                f"got shape={self.shape!r} on grid {layout.grid}"
            )
        if self.pool:
            if dims == 1:
                raise ValueError(f"pooling needs an (H, W) or (F, H, W) grid, got {layout.grid}")
            height, width = layout.grid[-2:]
            if height % self.pool or width % self.pool:
                raise ValueError(
                    f"pool={self.pool} must divide the image height and width, got {height} x {width}; "
                    "pick a pool size dividing both or pad the image"
                )

    def pooled_len(self, layout: TokenLayout) -> int:
        """Number of pooled keys appended after the sequence (0 without pooling)."""
        return layout.image_len // (self.pool * self.pool) if self.pool else 0

    def shared_pairs(self, layout: TokenLayout) -> int:
        """(query, key) pairs kept whatever the radius: text rows see every original key;
        image rows see every text key and every pooled key."""
        return layout.text_len * layout.seq_len + layout.image_len * (
            layout.text_len + self.pooled_len(layout)
        )
