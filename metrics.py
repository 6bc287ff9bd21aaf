"""How close an image is to a reference: PSNR and SSIM (Gaussian window 11, sigma 1.5).

Pure tensor functions on images in [0, 1] as ComfyUI passes them ([H, W, C]; batches
[B, H, W, C]); used by the Compare node, `make demo` and the benchmarks, so every figure the
pack prints comes from this one implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # pixels per side of SSIM's Gaussian window
SSIM_SIGMA = 1.5


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (inf when identical)."""
    mse = torch.mean((image.double() - reference.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Structural similarity of images [H, W, C] in [0, 1], averaged over channels."""
    x, y = (t.double().permute(2, 0, 1).unsqueeze(1) for t in (image, reference))  # [C, 1, H, W]
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    kernel = (torch.outer(g, g) / g.sum() ** 2)[None, None]
    blur = lambda t: F.conv2d(t, kernel)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.mean().item()


@dataclass(frozen=True)
class Scores:
    """One image against its reference."""

    psnr: float  # dB; inf when identical
    ssim: float


def check_pair(images: torch.Tensor, references: torch.Tensor) -> None:
    """Batches [B, H, W, C] that can be compared image by image, or an error that says what
    differs and what to do (never a silently broadcast or cropped comparison)."""
    for name, batch in (("image", images), ("reference", references)):
        if batch.ndim != 4:
            raise ValueError(f"Compare Images: the {name} input is not an IMAGE batch [batch, height, width, channels] "
                             f"(got shape {list(batch.shape)}); connect an image output such as VAE Decode's.")
    if images.shape[0] != references.shape[0]:
        raise ValueError(f"Compare Images: {images.shape[0]} image(s) against {references.shape[0]} reference(s); "
                         "compare batches of the same size (the same batch_size in both empty latents).")
    if images.shape[1:3] != references.shape[1:3]:
        raise ValueError(f"Compare Images: the images are {images.shape[2]} x {images.shape[1]} px and the references "
                         f"{references.shape[2]} x {references.shape[1]} px; compare images of the same size "
                         "(the same latent size for both samplers).")
    if images.shape[3] != references.shape[3]:
        raise ValueError(f"Compare Images: the images have {images.shape[3]} channels and the references "
                         f"{references.shape[3]}; compare images of the same kind (both RGB).")
    if min(images.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"Compare Images: SSIM's {SSIM_WINDOW} x {SSIM_WINDOW} window needs images at least "
                         f"{SSIM_WINDOW} px on each side; these are {images.shape[2]} x {images.shape[1]} px.")


def score_batch(images: torch.Tensor, references: torch.Tensor) -> list[Scores]:
    """PSNR and SSIM of each image against the reference at the same batch index."""
    check_pair(images, references)
    return [Scores(psnr(image, reference), ssim(image, reference))
            for image, reference in zip(images, references, strict=True)]


def difference(images: torch.Tensor, references: torch.Tensor, gain: float) -> torch.Tensor:
    """|image - reference| per pixel, multiplied by `gain` (small errors made visible), in [0, 1]."""
    return ((images.float() - references.float()).abs() * gain).clamp(0.0, 1.0)
