"""Run one ViewDefinition over resource files and write its rows: the engine of ``synthfactory view``.

The rows come from the code path ingest uses (:func:`synthfactory.fhir.views.compile_view`, its ``rows`` per
resource of the view's type, :meth:`CompiledView.table` per batch), with one difference: keys are the raw ids
(``getResourceKey()`` of ``Patient/p1`` is ``p1``), since nothing leaves the user's machine here; ingest keeps
its salted HMAC keys.

Inputs: NDJSON files (``.ndjson``, ``.jsonl``, also gzip-compressed ``.gz``), one resource a line, a Bundle on a
line giving its entries; a ``.json`` file holding one resource or a Bundle. A line that is not a JSON object with
a ``resourceType``, or a resource the view cannot take (a value that does not fit its column type, several values
in a non-collection column, a ``where`` that is not a boolean), is counted and reported by file, line and reason,
never a crash; resources of other types are counted as skipped.

Outputs: ``ndjson`` (one object a row, columns in the view's order; dates ``YYYY-MM-DD``, dateTimes in UTC with
``Z``), ``csv`` (a header row; a collection column as a JSON array; null as an empty field) or ``parquet`` (the
view's Arrow schema), written in batches so memory stays bounded.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

import orjson
import pyarrow as pa

from synthfactory.fhir.fhirpath import Env
from synthfactory.fhir.normalize import BadResource
from synthfactory.fhir.views import CompiledView, ViewError, compile_view, load_view_file
from synthfactory.errors import InputError

__all__ = ["FORMATS", "ViewRunReport", "load_view", "run_view", "raw_key"]

FORMATS = ("ndjson", "csv", "parquet")
BATCH_ROWS = 10_000
MAX_PROBLEMS_LISTED = 20


def raw_key(resource_type: str, source_id: str) -> str:
    """The key of ``Type/id`` in ``synthfactory view``: the id itself."""
    return source_id


@dataclass
class ViewRunReport:
    view: str
    resource: str
    columns: list[str]
    rows: int = 0
    resources: int = 0               # resources of the view's type read
    other_types: int = 0             # resources of other types, skipped
    refused: int = 0                 # lines or resources that gave no rows because of a problem
    reasons: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS_LISTED, "file:line: reason"

    def problem(self, where: str, reason: str) -> None:
        self.refused += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append(f"{where}: {reason}")


def load_view(path: str) -> CompiledView:
    """Read and compile a ViewDefinition file (.json, .yaml). Raises :class:`ViewError` (exit 2) with the
    reason: unreadable, not JSON/YAML, or an invalid definition naming its element."""
    try:
        definition = load_view_file(path)
    except OSError as exc:
        raise ViewError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - orjson/yaml parse errors have no common base
        raise ViewError(f"{path}: not a JSON or YAML document: {str(exc).splitlines()[0]}") from None
    return compile_view(definition, require_name=False)


def _open(path: str) -> IO[bytes]:
    fh = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=fh)  # type: ignore[return-value]
    return fh


def _resources(path: str, report: ViewRunReport) -> Iterator[tuple[str, Any]]:
    """(where, resource) of every resource in a file; unreadable lines are reported and skipped."""
    name = os.path.basename(path)
    try:
        fh = _open(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    with fh:
        try:
            if path.endswith(".json"):
                items = [(name, fh.read())]
            else:
                items = ((f"{name}:{i}", line) for i, line in enumerate(fh, 1))
            for where, raw in items:
                if not raw.strip():
                    continue
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    report.problem(where, "not JSON")
                    continue
                if type(doc) is not dict or type(doc.get("resourceType")) is not str:
                    report.problem(where, "not a FHIR resource (a JSON object with a resourceType)")
                    continue
                if doc["resourceType"] == "Bundle":
                    entries = doc.get("entry")
                    for j, e in enumerate(entries if type(entries) is list else ()):
                        r = e.get("resource") if type(e) is dict else None
                        if type(r) is dict and type(r.get("resourceType")) is str:
                            yield f"{where} entry[{j}]", r
                        else:
                            report.problem(f"{where} entry[{j}]", "a Bundle entry without a resource")
                    continue
                yield where, doc
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{path}: cannot read it: {exc}") from None


class _Writer:
    def __init__(self, fmt: str, out: IO[bytes], view: CompiledView):
        self.fmt, self.out, self.view = fmt, out, view
        self.parquet: Any = None
        self.csv: Any = None
        if fmt == "csv":
            self.text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
            self.csv = csv.writer(self.text, lineterminator="\n")
            self.csv.writerow(view.columns)

    def write(self, table: pa.Table) -> None:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.out, table.schema)
            if table.num_rows:
                self.parquet.write_table(table)
            return
        rows = table.to_pylist()
        if self.fmt == "ndjson":
            self.out.write(b"".join(orjson.dumps(r, option=orjson.OPT_UTC_Z) + b"\n" for r in rows))
            return
        for r in rows:
            self.csv.writerow([_csv_cell(v) for v in r.values()])

    def close(self) -> None:
        if self.fmt == "parquet":
            if self.parquet is None:
                self.write(self.view.table([]))
            self.parquet.close()
        elif self.fmt == "csv":
            self.text.flush()
            self.text.detach()
        self.out.flush()


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if type(v) is bool:
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return orjson.dumps(v, option=orjson.OPT_UTC_Z).decode()
    if hasattr(v, "isoformat"):
        return orjson.dumps(v, option=orjson.OPT_UTC_Z).decode()[1:-1]
    return v


def run_view(view: CompiledView, paths: list[str], out: IO[bytes], fmt: str = "ndjson") -> ViewRunReport:
    """Write the rows of ``view`` over the resources in ``paths`` to ``out`` (a binary stream) in ``fmt``.
    Raises :class:`InputError` for a file that cannot be read at all."""
    if fmt not in FORMATS:
        raise ViewError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    report = ViewRunReport(view=view.name, resource=view.resource, columns=view.columns)
    env = Env(raw_key)
    rows_fn, rtype = view.rows, view.resource
    writer = _Writer(fmt, out, view)
    batch: list = []
    for path in paths:
        for where, r in _resources(path, report):
            if r["resourceType"] != rtype:
                report.other_types += 1
                continue
            report.resources += 1
            try:
                got = rows_fn(r, env)
            except BadResource as bad:
                report.problem(where, bad.reason)
                continue
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
                report.problem(where, str(exc) if isinstance(exc, ValueError) else "malformed resource structure")
                continue
            batch.extend(got)
            if len(batch) >= BATCH_ROWS:
                report.rows += len(batch)
                writer.write(_table(view, batch, where, report))
                batch = []
    report.rows += len(batch)
    writer.write(_table(view, batch, "", report))
    writer.close()
    return report


def _table(view: CompiledView, rows: list, where: str, report: ViewRunReport) -> pa.Table:
    try:
        return view.table(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError, OverflowError):
        pass
    # one row the Arrow types refuse (a dateTime string the deferred check let through): row by row
    good = []
    for r in rows:
        try:
            view.table([r])
            good.append(r)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError, OverflowError):
            report.rows -= 1
            report.problem(where or "a row", "a value that does not fit its column type")
    return view.table(good)
