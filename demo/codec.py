"""The demo model's "VAE": a fixed, exactly invertible pixel <-> latent rearrangement.

Each pixel becomes four values in [-1, 1]: R, G, B and luma (0.299 R + 0.587 G + 0.114 B,
a redundant brightness channel that fills SD3's 16 latent channels usefully); every 2x2
block of those is stacked into channels (space-to-depth). So a latent of H x W holds a
2H x 2W image, and decoding reads R, G, B back. This is the latent *before* SD3's
latent_format.process_in, i.e. what ComfyUI's LATENT carries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FACTOR = 2  # pixels per latent cell along each side
CHANNELS = 4  # R, G, B, luma per pixel
LATENT_CHANNELS = CHANNELS * FACTOR * FACTOR
_LUMA = (0.299, 0.587, 0.114)


def encode(images: torch.Tensor) -> torch.Tensor:
    """RGB images [B, 3, 2H, 2W] in [0, 1] -> latents [B, 16, H, W]."""
    signed = images * 2 - 1
    luma = torch.einsum("bchw,c->bhw", signed, signed.new_tensor(_LUMA))[:, None]
    return F.pixel_unshuffle(torch.cat([signed, luma], dim=1), FACTOR)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, 16, H, W], or video latents [B, 16, F, H, W] -> RGB images [B (x F), 3, 2H, 2W]
    clamped to [0, 1] (a video's frames in order, one image each)."""
    if latents.ndim == 5:
        latents = latents.movedim(2, 1).flatten(0, 1)
    signed = F.pixel_shuffle(latents, FACTOR)[:, :3]
    return ((signed + 1) / 2).clamp(0, 1)
