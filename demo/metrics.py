"""Image similarity to the unpatched output: PSNR and SSIM (Gaussian window 11, sigma 1.5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (inf when identical)."""
    mse = torch.mean((image.double() - reference.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Structural similarity of images [H, W, C] in [0, 1], averaged over channels."""
    x, y = (t.double().permute(2, 0, 1).unsqueeze(1) for t in (image, reference))  # [C, 1, H, W]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    kernel = (torch.outer(g, g) / g.sum() ** 2)[None, None]
    blur = lambda t: F.conv2d(t, kernel)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.mean().item()
