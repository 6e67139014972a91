"""Shared fixtures: deterministic seeds; `cuda` tests skip (saying why) without a GPU.

Test files import ``zoo`` and ``helpers`` (re-exports of :mod:`geta_fx.testing`) as top-level
modules: pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path`` for them.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
