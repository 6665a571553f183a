"""Synthesizers behind one small interface: metadata, fit, save/load, sample.

Kinds (``make_synthesizer``; declared once in :mod:`synthfactory.kinds`):

* single table: SDV ``gaussian_copula``, ``ctgan``, ``tvae``, ``copulagan``; smartnoise ``dp_mst``, ``dp_aim``
  (differentially private, :mod:`synthfactory.synthesize.dp`);
* multi table: SDV ``hma``; sequences: SDV ``par`` (used by :mod:`synthfactory.synthesize.relational`).

All take and return ``{table: DataFrame}`` on ``fit`` like SDV 2.0. Neural kinds train through
:mod:`synthfactory.synthesize.training` (epoch progress in the log, time budget, checkpoints, resume).
Models are always saved CPU-mapped and load on a CPU-only machine even when trained on CUDA; a model
pickled on CUDA by plain SDV also loads here (its storages are mapped to the CPU while unpickling).
Sampling runs in bounded batches: :func:`sample_to_parquet` writes each batch as a Parquet row group, so
memory stays flat for millions of rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from synthfactory import kinds
from synthfactory.kinds import ARGN, KINDS, NEURAL, SynthesizerKind
from synthfactory.spec import SpecError
from synthfactory.storage import Store, is_s3, split_s3
from synthfactory.synthesize.device import detect_device, device_params

log = logging.getLogger(__name__)

TABLE = "patients"
SYNTHETIC_ID = "synthetic_id"
__all__ = ["ARGN", "KINDS", "NEURAL", "SYNTHETIC_ID", "TABLE", "ParquetSink", "column_metadata", "cpu_mapped", "fit",
           "iter_batches", "load", "load_bytes", "make_synthesizer", "metadata_dict", "sample", "sample_plain",
           "sample_to_parquet", "save", "sdtype_for", "synthetic_ids"]


def sdtype_for(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "datetime"
    if pd.api.types.is_numeric_dtype(series):
        return "numerical"
    return "categorical"


def column_metadata(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    cols = {c: {"sdtype": sdtype_for(df[c])} for c in df.columns if c not in exclude}
    for c, meta in cols.items():
        if meta["sdtype"] == "datetime":
            meta["datetime_format"] = "%Y-%m-%d"
    return cols


def metadata_dict(df: pd.DataFrame, exclude: tuple[str, ...] = (), overrides: dict[str, dict] | None = None) -> dict:
    """SDV 2 metadata derived from the modelling table's dtypes (deterministic, no value sniffing).
    ``overrides`` (column -> SDV column metadata, e.g. ``{"sdtype": "categorical"}`` or ``{"sdtype":
    "phone_number", "pii": True}``) replace the derived entry of that column."""
    cols = column_metadata(df, exclude)
    for c, meta in (overrides or {}).items():
        if c in cols:
            cols[c] = dict(meta)
    return {"tables": {TABLE: {"columns": cols}}, "METADATA_SPEC_VERSION": "V2"}


# -- build: one factory per family of the kind registry (synthfactory.kinds) -------------------------
def _sdv_factory(entry: SynthesizerKind, metadata: dict, params: dict[str, Any]) -> Callable[[], Any]:
    import importlib

    from sdv.metadata import Metadata

    module, name = entry.sdv_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(f"sdv.{module}"), name)
    params = device_params(entry.name, params)
    if entry.name == "hma":
        params.setdefault("verbose", False)
    meta = Metadata.load_from_dict(metadata)
    return lambda: cls(meta, **params)


def _dp_factory(entry: SynthesizerKind, metadata: dict, params: dict[str, Any]) -> Callable[[], Any]:
    from synthfactory.synthesize.dp import DPSynthesizer

    table = next(iter(metadata["tables"]))
    return lambda: DPSynthesizer(entry.name, table=table, **params)


def _argn_factory(entry: SynthesizerKind, metadata: dict, params: dict[str, Any]) -> Callable[[], Any]:
    from synthfactory.synthesize.argn import ArgnSynthesizer

    table = next(iter(metadata["tables"]))
    return lambda: ArgnSynthesizer(table=table, **params)


def _cart_factory(entry: SynthesizerKind, metadata: dict, params: dict[str, Any]) -> Callable[[], Any]:
    from synthfactory.synthesize.cart import CartSynthesizer

    return lambda: CartSynthesizer(**params)


_FACTORIES: dict[str, Callable[[SynthesizerKind, dict, dict[str, Any]], Callable[[], Any]]] = {
    "sdv": _sdv_factory, "dp": _dp_factory, "argn": _argn_factory, "cart": _cart_factory}


def make_synthesizer(kind: str, metadata: dict, params: dict[str, Any] | None = None) -> Any:
    """An unfitted synthesizer of ``kind`` (a :data:`synthfactory.kinds.REGISTRY` entry) for ``metadata``;
    a bad kind or bad ``params`` raise :class:`~synthfactory.spec.SpecError`."""
    entry = kinds.get(kind)
    if entry is None:
        raise SpecError(f"synthesizer.kind: unknown synthesizer {kind!r}; choose one of {sorted(KINDS)}")
    build = _FACTORIES[entry.family](entry, metadata, dict(params or {}))
    try:
        return build()
    except TypeError as err:
        raise SpecError(f"synthesizer.params: {err}") from None


def fit(train: pd.DataFrame | dict[str, pd.DataFrame], kind: str, params: dict[str, Any] | None, metadata: dict,
        *, plan: Any = None, constraints: list | None = None, transforms: str = "none",
        seed: int = 0, column_types: dict[str, str] | None = None) -> tuple[Any, float]:
    """Fit ``kind`` on ``train`` (one table, or ``{table: df}`` for HMA). Neural kinds with a
    :class:`~synthfactory.synthesize.training.TrainPlan` train resumably (epochs, checkpoints, time budget).
    ``transforms="ehr"`` puts the EHR-aware transforms (:mod:`synthfactory.synthesize.transforms`) between
    the table and the model: the result is then a
    :class:`~synthfactory.synthesize.transforms.ClinicalSynthesizer` whose samples have the table's own
    columns. ``seed`` seeds the transforms and the model's fit; ``column_types`` (a flat table's typed columns)
    tell the transforms which numeric columns are levels and which are dates."""
    transformer = None
    if transforms == "ehr" and isinstance(train, pd.DataFrame):
        from synthfactory.synthesize.transforms import EhrTransformer

        transformer = EhrTransformer(seed=seed, types=column_types).fit(train)
        train = transformer.transform(train)
        table = next(iter(metadata["tables"]))
        metadata = {**metadata, "tables": {table: {**metadata["tables"][table], "columns": transformer.sdtypes(
            metadata["tables"][table]["columns"])}}}
    _seed_everything(seed)
    entry = kinds.get(kind)
    if entry is not None and entry.family == "cart":
        params = {"seed": seed, **(params or {})}
        if params.pop("gate_missing", False) and transformer is not None:  # values fitted where present
            params.setdefault("gates", transformer.gates())
    synth = make_synthesizer(kind, metadata, params)
    if constraints:
        synth.add_constraints(constraints)
    table = next(iter(metadata["tables"]))
    data = train if isinstance(train, dict) else {table: train}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind in NEURAL and plan is not None:
            from synthfactory.synthesize.training import fit_resumable

            synth = fit_resumable(synth, data[table], kind, plan, table)
        else:
            synth.fit(data)
    seconds = time.perf_counter() - t0
    rows = sum(len(d) for d in data.values())
    cols = sum(d.shape[1] for d in data.values())
    log.info("fitted %s on %d rows x %d columns in %.2fs", kind, rows, cols, seconds)
    if transformer is not None:
        from synthfactory.synthesize.transforms import ClinicalSynthesizer

        synth = ClinicalSynthesizer(synth, transformer, table)
    return synth, seconds


def _seed_everything(seed: int) -> None:
    """Seed the global generators a fit may draw from (numpy's, torch's)."""
    import numpy as np

    np.random.seed(seed % (2 ** 32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency of sdv
        pass


def reseed(synth: Any, seed: int) -> None:
    """Make the next draws of ``synth`` start from ``seed``: the same model, seed and row count give the same
    rows, and another seed another draw (SDV's own sampler otherwise always starts from one fixed seed)."""
    target = synth.inner if hasattr(synth, "inner") else synth
    if hasattr(target, "reseed"):
        target.reseed(seed)
    elif hasattr(target, "_set_random_state") and getattr(target, "_model", None) is not None:
        if hasattr(target, "reset_sampling"):
            target.reset_sampling()
        target._set_random_state(int(seed))  # SDV single-table synthesizers: numpy and torch states


# -- save / load: always CPU-mapped ----------------------------------------------------------------
def _torch_modules(synth: Any) -> list[tuple[Any, str]]:
    """(owner, how) pairs for every torch network inside a synthesizer: ctgan models move with
    ``set_device``; deepecho's PAR keeps ``device`` and ``_model``."""
    if hasattr(synth, "members"):  # a relational model: its root, child and HMA synthesizers
        return [pair for member in synth.members() for pair in _torch_modules(member)]
    found = []
    models = [getattr(synth, "_model", None)]
    for sub in (getattr(synth, "_table_synthesizers", None) or {}).values():  # HMA children
        models.append(getattr(sub, "_model", None))
    for m in models:
        if m is None:
            continue
        if hasattr(m, "set_device") and (getattr(m, "_generator", None) is not None
                                         or getattr(m, "decoder", None) is not None):
            found.append((m, "set_device"))
        elif hasattr(m, "device") and getattr(m, "_model", None) is not None and hasattr(m._model, "to"):
            found.append((m, "par"))
    return found


@contextlib.contextmanager
def cpu_mapped(synth: Any) -> Iterator[list[str]]:
    """Move the synthesizer's networks to the CPU for pickling, and back afterwards. Yields the devices found."""
    import torch

    moved = []
    for m, how in _torch_modules(synth):
        if how == "set_device":
            moved.append((m, how, m._device))
            m.set_device(torch.device("cpu"))
        else:
            moved.append((m, how, m.device))
            m._model.to("cpu")
            m.device = torch.device("cpu")
    try:
        yield [str(d) for _, _, d in moved]
    finally:
        for m, how, dev in moved:
            if how == "set_device":
                m.set_device(dev)
            else:
                m._model.to(dev)
                m.device = dev


def save(synth: Any, uri: str, store: Store) -> int:
    """Pickle the synthesizer with its networks on the CPU (any worker can load it); returns the bytes written."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "synthesizer.pkl")
        with cpu_mapped(synth), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            synth.save(str(path))
        data = path.read_bytes()
    store.write_bytes(uri, data)
    return len(data)


@contextlib.contextmanager
def _storages_to_cpu() -> Iterator[None]:
    """While unpickling on a machine without CUDA, map tensors pickled on CUDA to the CPU (the storages of a
    pickled tensor are rebuilt by ``torch.storage._load_from_bytes``, which calls ``torch.load`` without
    ``map_location``)."""
    import io

    import torch
    import torch.storage

    if torch.cuda.is_available():
        yield
        return
    original = torch.storage._load_from_bytes

    def _load_cpu(b: bytes) -> Any:
        return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)

    torch.storage._load_from_bytes = _load_cpu
    try:
        yield
    finally:
        torch.storage._load_from_bytes = original


def _after_load(synth: Any) -> Any:
    """Put the networks on this worker's device (CUDA when present) and run SDV's version checks."""
    import torch

    device = torch.device(detect_device(log_warning=False))
    for m, how in _torch_modules(synth):
        if how == "set_device":
            m.set_device(device)
        else:
            m._model.to(device)
            m.device = device
    try:
        from sdv._utils import check_sdv_versions_and_warn, check_synthesizer_version
        from sdv.multi_table.base import BaseMultiTableSynthesizer
        from sdv.single_table.base import BaseSynthesizer

        for member in (synth.members() if hasattr(synth, "members") else [synth]):
            if isinstance(member, (BaseSynthesizer, BaseMultiTableSynthesizer)):
                check_synthesizer_version(member)
                check_sdv_versions_and_warn(member)
    except ImportError:  # pragma: no cover - older/newer SDV layouts
        pass
    return synth


def load_bytes(data: bytes) -> Any:
    import cloudpickle

    with _storages_to_cpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        synth = cloudpickle.loads(data)
    return _after_load(synth)


def load(uri: str, store: Store) -> Any:
    return load_bytes(store.read_bytes(uri))


# -- sampling -------------------------------------------------------------------------------------
def sample_plain(synth: Any, n: int, table: str = TABLE) -> pd.DataFrame:
    """One batch of ``n`` rows by the synthesizer's own ``sample`` (the ``table`` frame of a multi-table
    result, else its first), warnings silenced, index reset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = synth.sample(num_rows=n)
    if isinstance(part, dict):
        part = part[table] if table in part else next(iter(part.values()))
    return part.reset_index(drop=True)


def iter_batches(synth: Any, rows: int, batch_size: int = 100_000,
                 sampler: Callable[[Any, int], pd.DataFrame] | None = None) -> Iterator[pd.DataFrame]:
    """Yield ``rows`` synthetic rows in batches of at most ``batch_size`` (``sampler(synth, n)`` draws one batch;
    default: plain sampling). Progress goes to the log when there is more than one batch."""
    draw = sampler or sample_plain
    done = 0
    while done < rows:
        n = min(batch_size, rows - done)
        part = draw(synth, n)
        done += n
        if rows > batch_size:
            log.info("sample progress rows=%d/%d (%.0f%%)", done, rows, 100.0 * done / rows)
        yield part


def synthetic_ids(start: int, n: int, prefix: str = "syn") -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(start + 1, start + n + 1)]


def sample(synth: Any, rows: int, batch_size: int = 100_000,
           sampler: Callable[[Any, int], pd.DataFrame] | None = None) -> pd.DataFrame:
    """Sample ``rows`` rows (any number, also more than the real table) in bounded batches, in memory.
    Rows get fresh ids ``syn-0000001`` that have no relation to any real key. For large outputs use
    :func:`sample_to_parquet`."""
    parts = list(iter_batches(synth, rows, batch_size, sampler))
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    df.insert(0, SYNTHETIC_ID, synthetic_ids(0, len(df)))
    return df


class ParquetSink:
    """Write DataFrames as row groups of one Parquet file, locally first, then commit it to ``uri`` atomically
    (local: rename; s3: a streamed multipart upload from the local file). Memory holds one batch at a time."""

    def __init__(self, uri: str, store: Store):
        self.uri = uri
        self.store = store
        self.rows = 0
        self._writer: Any = None
        self._schema: Any = None
        if is_s3(uri):
            fd, self._local = tempfile.mkstemp(suffix=".parquet")
            os.close(fd)
        else:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            self._local = uri + ".partial"

    def write(self, df: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, preserve_index=False)
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self._local, self._schema, compression="zstd")
        elif table.schema != self._schema:  # e.g. an all-null batch typed as null: cast to the first batch's types
            table = table.cast(self._schema)
        self._writer.write_table(table)
        self.rows += len(df)

    def close(self) -> int:
        if self._writer is None:
            raise ValueError("no rows written")
        self._writer.close()
        size = os.path.getsize(self._local)
        if is_s3(self.uri):
            bucket, key = split_s3(self.uri)
            try:
                self.store._client().upload_file(self._local, bucket, key)
            finally:
                os.unlink(self._local)
        else:
            os.replace(self._local, self.uri)
        return size

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._local)


def sample_to_parquet(synth: Any, rows: int, uri: str, store: Store, batch_size: int = 100_000,
                      sampler: Callable[[Any, int], pd.DataFrame] | None = None,
                      postprocess: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> dict:
    """Sample ``rows`` rows batch by batch into one Parquet file at ``uri`` (one row group per batch): memory is
    bounded by ``batch_size`` whatever ``rows`` is. ``postprocess`` runs on each batch (constraint fixes)."""
    sink = ParquetSink(uri, store)
    done = 0
    try:
        for part in iter_batches(synth, rows, batch_size, sampler):
            if postprocess is not None:
                part = postprocess(part)
            part.insert(0, SYNTHETIC_ID, synthetic_ids(done, len(part)))
            sink.write(part)
            done += len(part)
        size = sink.close()
    except BaseException:
        sink.abort()
        raise
    return {"uri": uri, "rows": done, "bytes": size, "batches": -(-rows // batch_size)}
