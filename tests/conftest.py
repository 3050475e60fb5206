"""Shared fixtures: real Fashion-MNIST images and the real reference models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clcalib.testing import REFERENCE, require_dataset, split


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)  # CI has 2 cores; service tests run processes beside us


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """The reference models' preprocessing, as a tensor op: gray -> 3 channels, /255, normalise."""
    x = torch.from_numpy(images.copy()).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    return (x - 0.286) / 0.353


@pytest.fixture(scope="session")
def fmnist():
    require_dataset()
    train_x, _ = split("train")
    test_x, test_y = split("t10k")
    return {"train": to_tensor(train_x[:1024]), "test": to_tensor(test_x), "test_labels": torch.from_numpy(test_y.astype(np.int64))}


@pytest.fixture(scope="session")
def reference():
    from clcalib.graph.registry import build_model, read_state_dict

    def load(arch: str):
        return build_model(arch, 10, read_state_dict(REFERENCE / f"fmnist_{arch}.safetensors"))

    return load
