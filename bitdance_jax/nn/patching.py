"""Next-patch token order of the class-conditional models, shared by training, sampling
and decoding.

A latent grid [B, h, w, C] (NHWC) becomes a sequence [B, h*w, C]: with patch side p the
grid is cut into p x p patches taken in raster order, and each patch is read in raster
order, i.e. token n = ((py * (w/p) + px) * p + i) * p + j for cell (py*p + i, px*p + j).
p = 1 is plain raster order.
"""
from __future__ import annotations

import math

import numpy as np


def patch_side(parallel_num: int) -> int:
    """sqrt(parallel_num); the tokens predicted together form a square patch."""
    p = math.isqrt(int(parallel_num))
    if parallel_num < 1 or p * p != parallel_num:
        raise ValueError(f"parallel_num must be a square number (1, 4, 16, ...), got {parallel_num}")
    return p


def _check_grid(h: int, w: int, p: int):
    if h % p or w % p:
        raise ValueError(f"latent grid {h}x{w} does not split into {p}x{p} patches")


def patchify(grid, p: int):
    """[B, h, w, C] -> [B, h*w, C] in patch-raster order (numpy or jax arrays)."""
    b, h, w, c = grid.shape
    _check_grid(h, w, p)
    x = grid.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)


def unpatchify(tokens, p: int, h: int, w: int):
    """Inverse of ``patchify``: [B, h*w, C] -> [B, h, w, C]."""
    b, n, c = tokens.shape
    _check_grid(h, w, p)
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def token_cells(h: int, w: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the grid cell of every token, in token order."""
    cells = patchify(np.arange(h * w).reshape(1, h, w, 1), p)[0, :, 0]
    return cells // w, cells % w
