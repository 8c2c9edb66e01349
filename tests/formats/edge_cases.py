"""Matrices with the edge cases llama.cpp's quantizers handle specially, and random imatrices."""

from __future__ import annotations

import numpy as np

ROWS = 24


def edge_matrix(k: int, block: int, seed: int) -> np.ndarray:
    """Rows of several scales with the edge cases the C handles specially (row length ``k``)."""
    rng = np.random.default_rng(seed)
    scales = np.array([1e-3, 0.02, 1.0, 30.0, 1e4], np.float32)
    x = rng.standard_normal((ROWS, k)).astype(np.float32) * scales[np.arange(ROWS) % 5, None]
    x[0, :block] = 0  # an all-zero block
    x[1] = 0
    x[2, rng.integers(0, k)] = 3e38  # one huge value
    x[3] = rng.standard_normal(k) * 1e-20  # tiny values
    x[4, ::7] = 1e-20  # tiny values among normal ones
    x[5] = -np.abs(x[5])  # all negative
    x[6] = np.abs(x[6])
    x[7] = rng.laplace(size=k)  # heavy tails
    x[8] = rng.standard_cauchy(size=k)
    x[9, :block] = 0.5  # a constant block
    x[10, :block] = rng.integers(-8, 8, block)  # exact ties of the rounding
    x[11, :block] = rng.integers(-16, 16, block) + 0.5
    x[12, block:2 * block] *= 1e-5  # a small block among values of scale 1
    x[13, block - 1] = -6e4  # a value that overflows the f16 scale
    return x


def imatrix(k: int, seed: int) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(0, 2, k)).astype(np.float32)
