"""Caption fidelity: does a generated image show what its caption says?

PSNR against the unpatched model says whether a technique changed the picture; it cannot say
whether the picture was worth keeping. This score compares an image with the ground truth of
the scene its caption came from (scenes.py), at the image's own resolution:

- each captioned shape: the share of its true area that shows its colour inside its region
  (its bounding box grown by half its size on every side), times the share of all the
  pixels of that colour that lie inside the region. A shape drawn in the wrong place, twice,
  or smeared over the frame scores low;
- the background: the share of the pixels outside every shape region that show the
  background's colour or its pattern's second tone, times a pattern term (one minus the
  difference between the second tone's true and observed share: a plain background drawn
  striped, or the reverse, loses about half).

A pixel shows a colour when that colour is the nearest of the scene's colours and lies within
TOLERANCE of it in RGB. The score is the mean of the parts: true renders score about 1,
uniform noise about 0.
"""

from __future__ import annotations

import torch

from . import scenes

TOLERANCE = 0.25  # RGB distance (0..sqrt(3)) within which a pixel counts as a colour


def _palette(scene: scenes.Scene) -> torch.Tensor:
    """The scene's colours [K, 3]: each shape's, the background's, then its pattern's second tone."""
    colours = [torch.tensor(scenes.COLOURS[s.colour]) for s in scene.shapes]
    background = torch.tensor(scenes.COLOURS[scene.background.colour])
    return torch.stack([*colours, background, scenes.second_tone(background)])


def _classify(image: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Per pixel of an [H, W, 3] image: the index of the colour it shows, or -1 for none."""
    distance = torch.cdist(image.reshape(-1, 3).float(), palette.float())  # [H*W, K]
    nearest, index = distance.min(dim=1)
    return torch.where(nearest < TOLERANCE, index, -1).reshape(image.shape[:2])


def _region(shape: scenes.Shape, size: int) -> torch.Tensor:
    """The shape's bounding box grown by half its size on every side, as a boolean [size, size] mask."""
    inside = scenes.coverage(shape, size) > 0.5
    rows, cols = inside.any(dim=1).nonzero(), inside.any(dim=0).nonzero()
    margin = int(round(shape.size * size / 2))
    mask = torch.zeros(size, size, dtype=torch.bool)
    if len(rows):
        mask[max(0, int(rows[0]) - margin):int(rows[-1]) + 1 + margin,
             max(0, int(cols[0]) - margin):int(cols[-1]) + 1 + margin] = True
    return mask


def parts(image: torch.Tensor, scene: scenes.Scene) -> list[float]:
    """The score's parts for one image [H, W, 3] in [0, 1] (square): one per shape, then the background."""
    size = image.shape[0]
    if image.shape != (size, size, 3):
        raise ValueError(f"caption fidelity needs a square RGB image [H, W, 3], got {list(image.shape)}")
    shown = _classify(image, _palette(scene))
    regions = [_region(shape, size) for shape in scene.shapes]
    scores = []
    for k, (shape, region) in enumerate(zip(scene.shapes, regions, strict=True)):
        true_area = float((scenes.coverage(shape, size) > 0.5).sum().clamp(min=1))
        anywhere = float((shown == k).sum())
        inside = float(((shown == k) & region).sum())
        scores.append(0.0 if anywhere == 0 else min(1.0, inside / true_area) * inside / anywhere)
    background = ~torch.stack(regions).any(dim=0)
    tone, second = len(scene.shapes), len(scene.shapes) + 1
    is_background = (shown == tone) | (shown == second)
    share = float(is_background[background].float().mean()) if background.any() else 0.0
    truth = _classify(scenes.render_background(scene.background, size).permute(1, 2, 0), _palette(scene))
    true_second = float((truth[background] == second).float().mean()) if background.any() else 0.0
    observed = float((shown[background & is_background] == second).float().mean()) if share > 0 else 0.0
    scores.append(share * (1.0 - abs(observed - true_second)))
    return scores


def score(image: torch.Tensor, scene: scenes.Scene) -> float:
    """Caption fidelity of one image [H, W, 3] in [0, 1] drawn for `scene`'s caption: 0 to 1."""
    values = parts(image, scene)
    return sum(values) / len(values)
