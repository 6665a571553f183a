"""MOSTLY AI's TabularARGN (``mostlyai-engine``, Apache-2.0) as a synthfactory engine: ``kind: tabular_argn``.

``mostlyai-engine`` cannot share an environment with Airflow 3.3 (it needs ``psutil < 6``; the Task SDK needs
``>= 6.1``), so it runs the Airflow way for such libraries: in an isolated interpreter on the worker, like
``@task.external_python``, exchanging Parquet files. :class:`ArgnSynthesizer` has the interface of an SDV
single-table synthesizer (``fit({table: df})``, ``sample(num_rows)``, ``save(path)``) and runs
``argn_worker.py`` with that interpreter:

* the interpreter: ``synthesizer.params.python``, else ``$SYNTHFACTORY_ARGN_PYTHON``, else the project's
  ``.venv-argn/bin/python`` (``make argn-venv``) or ``/opt/argn/bin/python`` (the worker images);
* fit: the training table goes to a private temporary folder, the worker trains and deletes every copy of
  the real rows from its workspace; the model (ModelStore and column metadata, no rows) is kept inside the
  pickled synthesizer, so the fitted model is one artifact in staging like any other and sampling can run
  on another worker;
* device: CUDA when the worker's torch sees a GPU, else the CPU (logged), or ``params.device``;
* epochs from ``synthesizer.epochs``, ``time_budget_s`` as the engine's training-time cap, ``batch_size``;
  the worker's progress lines (epoch, losses) go to the task log;
* value protection (mostlyai's rare-category and extreme-value protection) is on unless
  ``params.value_protection: false``.

The synthetic rows come back with the training table's dtypes (booleans, integers, floats, strings).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from synthfactory.errors import ConfigError
from synthfactory.spec import SpecError

log = logging.getLogger(__name__)

__all__ = ["ArgnSynthesizer", "ArgnUnavailable", "argn_python", "PYTHON_ENV"]

PYTHON_ENV = "SYNTHFACTORY_ARGN_PYTHON"
WORKER = Path(__file__).with_name("argn_worker.py")
_DEFAULTS = (Path(__file__).resolve().parents[3] / ".venv-argn" / "bin" / "python", Path("/opt/argn/bin/python"))


class ArgnUnavailable(ConfigError, ValueError):
    """No interpreter with mostlyai-engine on this worker (a deployment setting, not a transient error)."""


def argn_python(explicit: str | None = None) -> str:
    """The interpreter that runs mostlyai-engine (see the module doc for the order of lookup)."""
    for candidate in (explicit, os.environ.get(PYTHON_ENV), *map(str, _DEFAULTS)):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
        if candidate and candidate in (explicit, os.environ.get(PYTHON_ENV)):
            raise ArgnUnavailable(f"tabular_argn: interpreter {candidate!r} not found or not executable")
    raise ArgnUnavailable(
        "tabular_argn: no interpreter with mostlyai-engine on this worker. Run `make argn-venv` (creates "
        f".venv-argn), or set ${PYTHON_ENV} / synthesizer.params.python to one (the worker images have "
        "/opt/argn/bin/python)")


def _run(python: str, args: list[str], timeout: float | None) -> dict:
    """Run the worker; stream its stderr (progress) to the log; return its last stdout line as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    cmd = [python, str(WORKER), *args]
    t0 = time.monotonic()
    # stdout carries one short JSON line, so reading stderr to the end first cannot block the worker
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None and proc.stdout is not None
    tail: list[str] = []
    for raw in proc.stderr:  # the worker prints figures only (epochs, losses), never rows
        line = raw.decode("utf-8", "replace").rstrip()
        if " progress " in line:
            log.info("tabular_argn %s", line)
        elif line:
            tail = (tail + [line])[-20:]
        if timeout and time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"tabular_argn {args[0]} exceeded {timeout:.0f}s")
    out = proc.stdout.read().decode("utf-8", "replace").strip().splitlines()
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"tabular_argn {args[0]} failed (exit {rc}): " + " | ".join(tail[-5:]))
    try:
        return json.loads(out[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"tabular_argn {args[0]}: the worker printed no result") from None


def _archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(folder)))
    return buf.getvalue()


def _unpack(data: bytes, folder: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")


_TRUE = {"true", "1", "yes"}


def restore_dtypes(df: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    """Give the engine's output the training table's column order and dtypes."""
    out = pd.DataFrame(index=range(len(df)))
    for col, dtype in dtypes.items():
        s = df[col] if col in df.columns else pd.Series([None] * len(df))
        s = s.reset_index(drop=True)
        if dtype == "bool":
            out[col] = s.astype("string").str.lower().isin(_TRUE).to_numpy(dtype=bool)
        elif dtype.startswith(("int", "uint")):
            num = pd.to_numeric(s, errors="coerce")
            out[col] = num.round().astype(dtype) if not num.isna().any() else num.astype("float64")
        elif dtype.startswith("float"):
            out[col] = pd.to_numeric(s, errors="coerce").astype(dtype)
        elif dtype.startswith("datetime"):
            out[col] = pd.to_datetime(s, errors="coerce")
        else:
            out[col] = s.astype(object).where(s.notna(), None)
    return out


class ArgnSynthesizer:
    """``fit({table: df})`` / ``sample(num_rows)`` / ``save(path)`` like an SDV single-table synthesizer."""

    def __init__(self, table: str = "patients", *, python: str | None = None, epochs: float = 100.0,
                 max_minutes: float | None = None, batch_size: int | None = None, seed: int = 42,
                 device: str = "auto", model: str = "MOSTLY_AI/Medium", value_protection: bool = True,
                 sample_batch_size: int | None = None, timeout_s: float | None = None):
        if device not in ("auto", "cpu", "cuda"):
            raise SpecError("synthesizer.params.device: one of auto, cpu, cuda")
        self.table = table
        self.python = python
        self.epochs = float(epochs)
        self.max_minutes = max_minutes
        self.batch_size = batch_size
        self.seed = int(seed)
        self.device = device
        self.model = model
        self.value_protection = bool(value_protection)
        self.sample_batch_size = sample_batch_size
        self.timeout_s = timeout_s
        self._dtypes: dict[str, str] = {}
        self._model: bytes | None = None
        self.fit_info: dict[str, Any] = {}
        self._sampled = 0

    # -- fit ------------------------------------------------------------------------------------------
    def fit(self, data: dict[str, pd.DataFrame] | pd.DataFrame) -> "ArgnSynthesizer":
        df = data if isinstance(data, pd.DataFrame) else data[self.table]
        if df.empty:
            raise ValueError("tabular_argn: the training table is empty")
        python = argn_python(self.python)
        self._dtypes = {c: str(t) for c, t in df.dtypes.items()}
        with tempfile.TemporaryDirectory(prefix="synthfactory-argn-") as tmp:
            os.chmod(tmp, 0o700)
            train = Path(tmp, "train.parquet")
            df.to_parquet(train, index=False)
            ws = Path(tmp, "ws")
            args = ["fit", "--train", str(train), "--workspace", str(ws), "--epochs", str(self.epochs),
                    "--seed", str(self.seed), "--device", self.device, "--model", self.model]
            if self.max_minutes:
                args += ["--max-minutes", str(self.max_minutes)]
            if self.batch_size:
                args += ["--batch-size", str(self.batch_size)]
            if not self.value_protection:
                args.append("--no-value-protection")
            self.fit_info = _run(python, args, self.timeout_s)
            train.unlink()
            self._model = _archive(ws)
        if self.fit_info.get("device") == "cpu" and self.device == "auto":
            log.warning("tabular_argn: no CUDA device on this worker; trained on the CPU")
        log.info("tabular_argn fitted on %d rows x %d columns in %.1fs (%s, %s epochs)", len(df), df.shape[1],
                 self.fit_info.get("seconds", 0.0), self.fit_info.get("device"), self.fit_info.get("epochs"))
        return self

    # -- sample ---------------------------------------------------------------------------------------
    def sample(self, num_rows: int, **_: Any) -> pd.DataFrame:
        if self._model is None:
            raise ValueError("tabular_argn: fit the synthesizer before sampling")
        python = argn_python(self.python)
        with tempfile.TemporaryDirectory(prefix="synthfactory-argn-") as tmp:
            ws = Path(tmp, "ws")
            _unpack(self._model, ws)
            out = Path(tmp, "synthetic.parquet")
            # a different seed per call: batches of one run must not repeat each other
            args = ["sample", "--workspace", str(ws), "--rows", str(int(num_rows)), "--out", str(out),
                    "--seed", str(self.seed + self._sampled), "--device", self.device]
            if self.sample_batch_size:
                args += ["--batch-size", str(self.sample_batch_size)]
            _run(python, args, self.timeout_s)
            self._sampled += 1
            df = pd.read_parquet(out)
        return restore_dtypes(df, self._dtypes)

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        import cloudpickle

        with open(path, "wb") as fh:
            cloudpickle.dump(self, fh)

    @property
    def model_bytes(self) -> int:
        return len(self._model or b"")


if __name__ == "__main__":  # pragma: no cover - `python -m synthfactory.synthesize.argn`: which interpreter
    print(argn_python())
    sys.exit(0)
