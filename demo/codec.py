"""The demo model's "VAE": a fixed, exactly invertible pixel <-> latent rearrangement.

Each pixel becomes four values in [-1, 1]: R, G, B and luma (0.299 R + 0.587 G + 0.114 B,
a redundant brightness channel that fills SD3's 16 latent channels usefully); every 2x2
block of those is stacked into channels (space-to-depth). So a latent of H x W holds a
2H x 2W image, and decoding reads R, G, B back. This is the latent *before* SD3's
latent_format.process_in, i.e. what ComfyUI's LATENT carries.

The demo U-Net (SD 1.5 layout, 4 latent channels) has its own lossy variant, `encode_cells` /
`decode_cells`: each latent cell holds the mean R, G, B and luma of a 4 x 4 pixel block, divided by
SD 1.5's latent scale (0.18215) so that after its process_in the model sees values in [-1, 1], as
it would a real SD 1.5 VAE latent; decoding upsamples R, G, B bilinearly.
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
    """Latents [B, 16, H, W] -> RGB images [B, 3, 2H, 2W] clamped to [0, 1]."""
    signed = F.pixel_shuffle(latents, FACTOR)[:, :3]
    return ((signed + 1) / 2).clamp(0, 1)


def flatten_frames(latents: torch.Tensor) -> torch.Tensor:
    """Video latents [B, C, F, H, W] -> [B * F, C, H, W], each video's frames in order (a video model's
    one-frame latent becomes an image latent); image latents pass unchanged."""
    return latents.movedim(2, 1).flatten(0, 1) if latents.ndim == 5 else latents


CELL_FACTOR = 4  # pixels per U-Net latent cell along each side
CELL_CHANNELS = 4  # R, G, B, luma: SD 1.5's latent channels
SD15_SCALE = 0.18215  # SD 1.5's latent_format.scale_factor


def encode_cells(images: torch.Tensor) -> torch.Tensor:
    """RGB images [B, 3, 4H, 4W] in [0, 1] -> U-Net latents [B, 4, H, W] (block means, SD 1.5 scale)."""
    signed = images * 2 - 1
    luma = torch.einsum("bchw,c->bhw", signed, signed.new_tensor(_LUMA))[:, None]
    return F.avg_pool2d(torch.cat([signed, luma], dim=1), CELL_FACTOR) / SD15_SCALE


def decode_cells(latents: torch.Tensor) -> torch.Tensor:
    """U-Net latents [B, 4, H, W] -> RGB images [B, 3, 4H, 4W] clamped to [0, 1] (bilinear)."""
    signed = F.interpolate(latents[:, :3] * SD15_SCALE, scale_factor=CELL_FACTOR, mode="bilinear",
                           align_corners=False)
    return ((signed + 1) / 2).clamp(0, 1)
