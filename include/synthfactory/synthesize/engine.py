"""SDV synthesizers behind one small interface: metadata, fit, save/load, sample."""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from synthfactory.storage import Store

log = logging.getLogger(__name__)

TABLE = "patients"
SYNTHETIC_ID = "synthetic_id"
NEURAL = {"ctgan", "tvae", "copulagan"}


def sdtype_for(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "datetime"
    if pd.api.types.is_numeric_dtype(series):
        return "numerical"
    return "categorical"


def metadata_dict(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> dict:
    """SDV 2 metadata derived from the modelling table's dtypes (deterministic, no value sniffing)."""
    cols = {c: {"sdtype": sdtype_for(df[c])} for c in df.columns if c not in exclude}
    for c, meta in cols.items():
        if meta["sdtype"] == "datetime":
            meta["datetime_format"] = "%Y-%m-%d"
    return {"tables": {TABLE: {"columns": cols}}, "METADATA_SPEC_VERSION": "V2"}


def _device_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    if kind not in NEURAL or "enable_gpu" in params:
        return params
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a dependency of sdv
        cuda = False
    if not cuda:
        log.warning("%s: no CUDA device found; training on CPU (route neural synthesizers to the gpu queue)",
                    kind)
    return {**params, "enable_gpu": cuda}


def make_synthesizer(kind: str, metadata: dict, params: dict[str, Any] | None = None) -> Any:
    from sdv.metadata import Metadata
    from sdv.single_table import (CopulaGANSynthesizer, CTGANSynthesizer, GaussianCopulaSynthesizer,
                                  TVAESynthesizer)

    classes = {"gaussian_copula": GaussianCopulaSynthesizer, "ctgan": CTGANSynthesizer,
               "tvae": TVAESynthesizer, "copulagan": CopulaGANSynthesizer}
    if kind not in classes:
        raise ValueError(f"synthesizer.kind: unknown synthesizer {kind!r}; choose one of {sorted(classes)}")
    params = _device_params(kind, dict(params or {}))
    meta = Metadata.load_from_dict(metadata)
    try:
        return classes[kind](meta, **params)
    except TypeError as err:
        raise ValueError(f"synthesizer.params: {err}") from None


def fit(train: pd.DataFrame, kind: str, params: dict[str, Any] | None, metadata: dict) -> tuple[Any, float]:
    synth = make_synthesizer(kind, metadata, params)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        synth.fit({TABLE: train})
    seconds = time.perf_counter() - t0
    log.info("fitted %s on %d rows x %d columns in %.2fs", kind, len(train), train.shape[1], seconds)
    return synth, seconds


def save(synth: Any, uri: str, store: Store) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "synthesizer.pkl")
        synth.save(str(path))
        data = path.read_bytes()
    store.write_bytes(uri, data)
    return len(data)


def load(uri: str, store: Store) -> Any:
    from sdv.utils import load_synthesizer

    with tempfile.TemporaryDirectory() as tmp:
        path = store.local_copy(uri, Path(tmp, "synthesizer.pkl"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_synthesizer(str(path))


def sample(synth: Any, rows: int, batch_size: int = 100_000) -> pd.DataFrame:
    """Sample ``rows`` rows (any number, also more than the real table) in bounded batches.
    Rows get fresh ids ``syn-0000001`` that have no relation to any real key."""
    parts = []
    done = 0
    while done < rows:
        n = min(batch_size, rows - done)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            part = synth.sample(num_rows=n)
        if isinstance(part, dict):
            part = part[TABLE]
        parts.append(part)
        done += n
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    df.insert(0, SYNTHETIC_ID, [f"syn-{i:07d}" for i in range(1, len(df) + 1)])
    return df
