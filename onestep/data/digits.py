"""scikit-learn's 1797 handwritten digits as 8x8 one-channel images in [-1, 1] (the embedded default data set)."""

from __future__ import annotations

import numpy as np
import torch


NUM_CLASSES = 10
RESOLUTION = 8


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) float32 in [-1, 1] and labels (N,) int64; the values 0..16 map linearly onto [-1, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return images[:, None], bunch.target.astype(np.int64)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_arrays()
    return torch.from_numpy(images), torch.from_numpy(labels)


def split_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified half/half index split (the real-vs-real floor and the classifier's held-out set use it)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
