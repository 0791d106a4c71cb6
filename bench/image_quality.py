"""How close an image is to a reference where it is not meant to be equal (quantization): SSIM.

Mean absolute pixel difference, which the tests use for "equal to eager", cannot tell noise spread thinly over an image
from a changed picture; SSIM (Wang et al. 2004) compares local means, contrasts and structure, 1.0 for identical images.
Pure numpy, so that the tests and the benchmarks need nothing beyond it.
"""
from __future__ import annotations

import numpy as np

_WINDOW = 11
_SIGMA = 1.5


def _gaussian_window() -> np.ndarray:
    x = np.arange(_WINDOW) - _WINDOW // 2
    window = np.exp(-x**2 / (2 * _SIGMA**2))
    return window / window.sum()


def _filtered(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The Gaussian-weighted local means of a (H, W, C) float image, where the window fits (H-10, W-10, C)."""
    taps = len(window)
    rows = sum(w * image[i:image.shape[0] - taps + 1 + i] for i, w in enumerate(window))
    return sum(w * rows[:, i:rows.shape[1] - taps + 1 + i] for i, w in enumerate(window))


def ssim(image, reference, data_range: float = 255.0) -> float:
    """Mean SSIM of two images of the same shape ((H, W) or (H, W, C), uint8 by default), each channel on its own, with
    the standard constants (K1 0.01, K2 0.03) and an 11-pixel Gaussian window of sigma 1.5."""
    a, b = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[:2]) < _WINDOW:
        raise ValueError(f"images of {a.shape[0]}x{a.shape[1]} are smaller than the {_WINDOW}-pixel window")
    window = _gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean_a, mean_b = _filtered(a, window), _filtered(b, window)
    var_a = _filtered(a * a, window) - mean_a**2
    var_b = _filtered(b * b, window) - mean_b**2
    covariance = _filtered(a * b, window) - mean_a * mean_b
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())
