"""Image files in and out: reading with Pillow, [-1,1] <-> uint8, PNG grids, PSNR/SSIM."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

RESIZE_MODES = ("center-crop", "resize")


def load_image(path: str, size: int | tuple[int, int], mode: str = "center-crop") -> np.ndarray:
    """Any Pillow-readable file -> float32 [H,W,3] in [-1,1].

    ``center-crop``: crop the largest centred square, then resize to ``size`` (an int);
    ``resize``: resize straight to ``size`` ((H, W) or an int), ignoring aspect ratio.
    Any mode (grey, palette, RGBA, 16-bit) is converted to RGB first.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose from {RESIZE_MODES}")
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e
    h, w = (size, size) if isinstance(size, int) else size
    if mode == "center-crop":
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
    im = im.resize((w, h), Image.BICUBIC)
    return from_uint8(np.asarray(im))


def from_uint8(images):
    """uint8 [0,255] -> float32 in [-1,1]; numpy or jax arrays (the one place of this scaling)."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [-1,1] -> uint8 [0,255], rounded and clipped (grids, round trips)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_uint8_like_reference(images) -> np.ndarray:
    """Float images in [-1,1] -> uint8 as the reference writes samples: clamp(127.5 x + 128, 0,
    255) truncated, so sample files match its evaluation inputs bit for bit."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 grid image, ``ncol`` columns (default ~square)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = im
    return grid


def save_png(image: np.ndarray, path: str) -> str:
    """Write a uint8 [H,W,3] array as PNG (creating parent dirs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, x)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5) over channels of two uint8 images."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(a.shape[:2]) < 11:
        raise ValueError("SSIM needs images of at least 11x11 pixels")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a ** 2
    var_b = _gaussian_filter(b * b) - mu_b ** 2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
