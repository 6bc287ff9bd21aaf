"""Procedural training data: coloured shapes on patterned backgrounds, with captions.

Scenes live in unit coordinates (x right, y down, both in [0, 1]) so one scene renders at
any resolution; edges are anti-aliased from signed distances so small and large renders
agree. In two-shape scenes the first-named shape is always the left one, which gives the
captions a testable spatial meaning.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.88, 0.10),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
T = TypeVar("T")
SHAPES = ("circle", "square", "triangle", "cross")
PATTERNS = ("plain", "striped", "checkered", "dotted")
SMALL, BIG = 0.15, 0.24  # half-extent thresholds for the "small" / "big" adjectives
MIN_SIZE, MAX_SIZE = 0.10, 0.28


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float
    y: float
    size: float  # half-extent as a fraction of the image side


@dataclass(frozen=True)
class Background:
    pattern: str
    colour: str
    frequency: float  # pattern repeats across the image
    angle: float  # stripe direction in radians
    phase: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: Background

    @property
    def caption(self) -> str:
        parts = [_noun_phrase(s) for s in self.shapes]
        bg = self.background
        words = [bg.colour] if bg.pattern == "plain" else [bg.pattern, bg.colour]
        return f"{' and '.join(parts)} on {_article(words[0])} {' '.join(words)} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(shape: Shape) -> str:
    words = [shape.colour, shape.kind]
    if shape.size < SMALL:
        words.insert(0, "small")
    elif shape.size > BIG:
        words.insert(0, "big")
    return f"{_article(words[0])} {' '.join(words)}"


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the text encoder's token ids)."""
    words = ["a", "an", "and", "on", "background", "small", "big"]
    return words + list(COLOURS) + list(SHAPES) + [p for p in PATTERNS if p != "plain"]


HELD_OUT_EVERY = 16  # one caption in 16 is never trained on: the held-out set that fidelity is measured on


def is_held_out(caption: str) -> bool:
    """Whether a caption belongs to the held-out set (a fixed hash of its text, so the split
    holds for every run and every seed)."""
    return zlib.crc32(caption.encode()) % HELD_OUT_EVERY == 0


def random_scene(gen: torch.Generator, held_out: bool = False) -> Scene:
    """A scene whose caption is in the training set (or, with `held_out`, in the held-out set)."""
    while True:
        scene = _draw_scene(gen)
        if is_held_out(scene.caption) == held_out:
            return scene


def held_out_scenes(count: int, seed: int = 0) -> list[Scene]:
    """`count` scenes with distinct held-out captions, the same for every call with this seed."""
    gen = torch.Generator().manual_seed(seed)
    found: dict[str, Scene] = {}
    while len(found) < count:
        scene = random_scene(gen, held_out=True)
        found.setdefault(scene.caption, scene)
    return list(found.values())


def _draw_scene(gen: torch.Generator) -> Scene:
    """One or two shapes of distinct colours, none the background's colour."""

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=gen).item()

    def pick(options: Sequence[T]) -> T:
        return options[int(torch.randint(len(options), (), generator=gen))]

    names = list(COLOURS)
    bg_colour = pick(names)
    background = Background(
        pattern=pick(PATTERNS),
        colour=bg_colour,
        frequency=uniform(4.0, 8.0),
        angle=math.radians(pick((0, 45, 90, 135))),
        phase=uniform(0.0, 1.0),
    )
    count = 1 + int(torch.rand((), generator=gen) < 0.5)
    free = [c for c in names if c != bg_colour]
    shapes = []
    for i in range(count):
        colour = pick(free)
        free.remove(colour)
        size = uniform(MIN_SIZE, MAX_SIZE if count == 1 else 0.2)
        if count == 1:
            x = uniform(0.3, 0.7)
        else:
            x = uniform(0.22, 0.36) if i == 0 else uniform(0.64, 0.78)
        shapes.append(Shape(pick(SHAPES), colour, x, uniform(0.3, 0.7), size))
    return Scene(tuple(shapes), background)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.meshgrid(centres, centres, indexing="ij")  # (y, x)


def _box(dx: torch.Tensor, dy: torch.Tensor, half_w: float, half_h: float) -> torch.Tensor:
    return torch.maximum(dx.abs() - half_w, dy.abs() - half_h)


def _signed_distance(shape: Shape, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dx, dy, r = x - shape.x, y - shape.y, shape.size
    if shape.kind == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape.kind == "square":
        return _box(dx, dy, r * 0.9, r * 0.9)
    if shape.kind == "cross":
        arm = r * 0.35
        return torch.minimum(_box(dx, dy, r, arm), _box(dx, dy, arm, r))
    # triangle, apex up: three half-planes around the centre (inradius r / 2, scaled to read as big)
    dy = dy - r * 0.2
    edges = [dy]
    for angle in (math.radians(210), math.radians(330)):
        edges.append(dx * math.cos(angle) + dy * math.sin(angle))
    return torch.stack(edges).amax(0) - r * 0.6


def _coverage(distance: torch.Tensor, size: int) -> torch.Tensor:
    """Signed distance -> anti-aliased coverage one pixel wide."""
    return (0.5 - distance * size).clamp(0.0, 1.0)


def _pattern_mask(bg: Background, y: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    if bg.pattern == "plain":
        return torch.zeros_like(x)
    period_px = size / bg.frequency

    def square_wave(u: torch.Tensor) -> torch.Tensor:
        # 1 on half of each period, with a one-pixel soft edge
        return ((0.25 - ((u * bg.frequency + bg.phase) % 1.0 - 0.5).abs()) * period_px + 0.5).clamp(0, 1)

    if bg.pattern == "striped":
        return square_wave(x * math.cos(bg.angle) + y * math.sin(bg.angle))
    if bg.pattern == "checkered":
        a, b = square_wave(x), square_wave(y)
        return a + b - 2 * a * b
    # dotted
    cell = 1.0 / bg.frequency
    cx = ((x + bg.phase * cell) % cell) - cell / 2
    cy = ((y + bg.phase * cell) % cell) - cell / 2
    return _coverage(torch.sqrt(cx * cx + cy * cy) - cell * 0.28, size)


def second_tone(rgb: torch.Tensor) -> torch.Tensor:
    """The pattern's other colour: the background colour moved 40% toward white or black."""
    luma = float(rgb @ torch.tensor([0.299, 0.587, 0.114]))
    target = torch.zeros(3) if luma > 0.5 else torch.ones(3)
    return rgb + 0.4 * (target - rgb)


def coverage(shape: Shape, size: int) -> torch.Tensor:
    """How much of each pixel of a size x size render the shape covers: [size, size] in [0, 1]."""
    y, x = _grid(size)
    return _coverage(_signed_distance(shape, y, x), size)


def render_background(background: Background, size: int) -> torch.Tensor:
    """The background alone as an RGB image [3, size, size] in [0, 1]."""
    y, x = _grid(size)
    base = torch.tensor(COLOURS[background.colour])
    mask = _pattern_mask(background, y, x, size)
    return base[:, None, None] + mask[None] * (second_tone(base) - base)[:, None, None]


def render(scene: Scene, size: int) -> torch.Tensor:
    """The scene as an RGB image [3, size, size] in [0, 1]."""
    image = render_background(scene.background, size)
    for shape in scene.shapes:
        cover = coverage(shape, size)[None]
        image = image + cover * (torch.tensor(COLOURS[shape.colour])[:, None, None] - image)
    return image


def render_batch(scenes: list[Scene], size: int) -> torch.Tensor:
    return torch.stack([render(s, size) for s in scenes])
