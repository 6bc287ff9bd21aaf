"""The Compare Images node and the metrics behind it (metrics.py): PSNR and SSIM against
reference computations written here, the pictures it returns, and clear errors for batches
that cannot be compared image by image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from harness import pack_import

metrics = pack_import("metrics")
compare = pack_import("nodes.compare")


def _images(seed: int, batch: int = 2, height: int = 16, width: int = 20) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def _reference_psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return 10.0 * math.log10(1.0 / mse)


def _reference_ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM by its definition: for every 11 x 11 window that fits, Gaussian-weighted (sigma 1.5)
    means, variances and covariance, one score per window and channel, averaged."""
    offsets = np.arange(11) - 5
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    weights /= weights.sum()
    c1, c2 = 0.01**2, 0.03**2
    height, width, channels = image.shape
    scores = []
    for c in range(channels):
        for top in range(height - 10):
            for left in range(width - 10):
                x = image[top:top + 11, left:left + 11, c].astype(np.float64)
                y = reference[top:top + 11, left:left + 11, c].astype(np.float64)
                mx, my = (weights * x).sum(), (weights * y).sum()
                vx, vy = (weights * (x - mx) ** 2).sum(), (weights * (y - my) ** 2).sum()
                cov = (weights * (x - mx) * (y - my)).sum()
                scores.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(scores))


def test_psnr_is_infinite_for_identical_images_and_matches_the_reference_otherwise():
    reference = _images(0)[0]
    assert metrics.psnr(reference.clone(), reference) == math.inf
    noisy = (reference + 0.05 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    value = metrics.psnr(noisy, reference)
    assert math.isfinite(value)
    assert value == pytest.approx(_reference_psnr(noisy.numpy(), reference.numpy()), abs=1e-9)


def test_ssim_matches_the_windowed_reference():
    reference = _images(2)[0]
    blurred = (0.6 * reference + 0.4 * _images(3)[0])  # correlated with the reference, not equal to it
    assert metrics.ssim(reference, reference) == pytest.approx(1.0, abs=1e-12)
    value = metrics.ssim(blurred, reference)
    assert 0.0 < value < 0.99
    assert value == pytest.approx(_reference_ssim(blurred.numpy(), reference.numpy()), abs=1e-9)


def test_the_node_scores_each_image_and_shows_the_scores_on_the_node():
    reference = _images(4)
    image = reference.clone()
    image[1] = (image[1] + 0.1).clamp(0, 1)  # the first image identical, the second not
    output = compare.CompareImages.execute(reference, image, "side by side", 4.0)
    comparison, text = output.result
    assert comparison.shape == (2, 16, 40, 3)
    assert torch.equal(comparison[:, :, :20], reference) and torch.equal(comparison[:, :, 20:], image)
    lines = text.splitlines()
    assert lines[0] == "image vs. reference, 20 x 16 px"
    assert lines[1] == f"image 1: PSNR inf dB (identical), SSIM {1.0:.4f}"
    expected = _reference_psnr(image[1].numpy(), reference[1].numpy())
    assert lines[2].startswith(f"image 2: PSNR {expected:.2f} dB, SSIM ")
    assert lines[3].startswith("mean: PSNR inf dB")
    assert output.ui["text"] == (text,) and len(output.ui["images"]) == 2  # text and previews shown on the node


def test_the_difference_view_amplifies_the_error():
    reference = torch.full((1, 12, 12, 3), 0.5)
    image = reference + 0.02
    (difference, _), three = (compare.CompareImages.execute(reference, image, view, 10.0).result
                              for view in ("difference", "side by side + difference"))
    assert difference.shape == (1, 12, 12, 3) and torch.allclose(difference, torch.full_like(difference, 0.2))
    assert three[0].shape == (1, 12, 36, 3) and torch.equal(three[0][:, :, 24:], difference)


@pytest.mark.parametrize(("image", "reference", "message"), [
    (_images(5, batch=2), _images(6, batch=1), "2 image(s) against 1 reference(s)"),
    (_images(5, height=16, width=20), _images(6, height=20, width=16), "the images are 20 x 16 px and the references 16 x 20 px"),
    (_images(5)[..., :1].expand(-1, -1, -1, 4).contiguous(), _images(6), "4 channels and the references 3"),
    (_images(5, height=8, width=8), _images(6, height=8, width=8), "at least 11 px on each side"),
    (_images(5)[0], _images(6)[0], "not an IMAGE batch"),
])
def test_batches_that_cannot_be_compared_are_a_clear_error(image, reference, message):
    with pytest.raises(ValueError, match="Compare Images: ") as error:
        compare.CompareImages.execute(reference, image, "side by side", 4.0)
    assert message in str(error.value)
