"""Synthesis tests: tiny tables and epochs, one torch thread (2 shared cores: more threads only contend)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_table() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 100
    return pd.DataFrame({
        "gender": rng.choice(["female", "male"], n, p=[0.7, 0.3]).astype(object),
        "age": rng.integers(20, 90, n).astype("int64"),
        "cond_e11_9": rng.random(n) < 0.1,
        "hba1c": rng.normal(6, 1, n).round(1),
    })


TINY_CTGAN = {"embedding_dim": 8, "generator_dim": (16,), "discriminator_dim": (16,), "batch_size": 20,
              "enable_gpu": False}
TINY_TVAE = {"embedding_dim": 8, "compress_dims": (16,), "decompress_dims": (16,), "batch_size": 20,
             "enable_gpu": False}
