"""Shared helpers for the benchmark scripts in bench/ (import as ``from common import ...`` after putting
bench/ on sys.path, or ``from bench.common import ...`` from the project root).

* the JSON contract of a per-stage bench output (see bench/README.md): :func:`result`, :func:`payload`,
  :func:`write_json`, and :func:`normalize` that turns reasonable variations of it into the contract;
* :func:`machine_info`: CPU model, cores, RAM, Python, key package versions, date;
* :class:`RssSampler`: peak RSS of a process tree (a pid and its children, or this process's children),
  sampled every 0.2 s in a thread; :func:`run_sampled` runs a command under it;
* :func:`timed` / :func:`best_of`: wall-clock timing with fixed repeats;
* :func:`markdown_table` / :func:`write_markdown`: the one results table;
* :func:`standard_args`: ``--sizes N [N ...]`` (spaces or commas), ``--out PATH``, ``--smoke``,
  ``--seed``, ``--repeat``.

Only the standard library and psutil are imported at module level, so importing this never perturbs a
measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SCHEMA_VERSION = 1
DEFAULT_SEED = 42

#: packages whose versions every result records (absent ones are reported as null)
KEY_PACKAGES = ("synthfactory", "apache-airflow", "sdv", "sdmetrics", "great-expectations", "pandas", "numpy",
                "pyarrow", "orjson", "duckdb", "fhiry", "anonymeter", "torch", "psutil", "fhir.resources",
                "clinosim", "carebundle", "matplotlib")


# --------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(names: Iterable[str] = KEY_PACKAGES) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """Where the figures were measured. CPU cores: the ones this process may use (affinity), and logical."""
    try:
        import psutil

        ram = psutil.virtual_memory().total
        physical = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil missing: still describe the machine
        ram, physical = None, None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores_usable": usable,
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": physical,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": package_versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------------
# Memory: peak RSS of a process tree
# --------------------------------------------------------------------------------------------------
class RssSampler:
    """Peak resident memory of a process tree, sampled every ``interval`` seconds in a daemon thread.

    ``pid``: that process plus all its descendants. ``pid=None``: every descendant of this process
    (use it around ``subprocess.run`` in another thread, or around a library call that starts workers),
    plus this process itself when ``include_self``. The figure is the largest sum of RSS seen at one
    sample: short spikes between samples are missed, so compare like with like (same interval)."""

    def __init__(self, pid: int | None = None, interval: float = 0.2, include_self: bool = False):
        import psutil

        self._psutil = psutil
        self.pid = pid
        self.interval = interval
        self.include_self = include_self
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tree(self) -> list[Any]:
        ps = self._psutil
        try:
            if self.pid is not None:
                root = ps.Process(self.pid)
                return [root, *root.children(recursive=True)]
            me = ps.Process()
            return [*([me] if self.include_self else []), *me.children(recursive=True)]
        except (ps.NoSuchProcess, ps.AccessDenied):
            return []

    def sample(self) -> int:
        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                pass
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return self.peak_bytes

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def run_sampled(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                log_path: Path | None = None, interval: float = 0.2, timeout: float | None = None,
                ) -> dict[str, Any]:
    """Run ``cmd`` as a subprocess; return its exit code, wall seconds and the peak RSS (MiB) of its tree."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        with RssSampler(proc.pid, interval=interval) as rss:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        wall = time.perf_counter() - t0
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    return {"returncode": rc, "seconds": wall, "peak_rss_mib": rss.peak_mib, "samples": rss.samples}


def peak_rss_self_mib() -> float:
    """This process's lifetime peak RSS (ru_maxrss), MiB: for a bench that runs one engine per process."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """The fastest of ``repeat`` runs (seconds) and the last run's value."""
    best, value = math.inf, None
    for _ in range(max(1, repeat)):
        s, value = timed(fn)
        best = min(best, s)
    return best, value


# --------------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------------
HIGHER_UNITS = ("/s", "per s", "per_s", "per second", "throughput", "rows/s", "resources/s", "score")
LOWER_UNITS = ("s", "sec", "seconds", "ms", "mib", "mb", "gib", "gb", "bytes", "ratio")


def guess_better(unit: str | None, figure: str = "") -> str:
    """'higher' for throughputs (…/s), else 'lower' (seconds, memory)."""
    u = (unit or "").strip().lower()
    f = figure.lower()
    if "/s" in u or "per s" in u or "throughput" in f or "per second" in f or u.endswith("_per_s"):
        return "higher"
    return "lower"


def ratio_of(ours: float | None, anchor: float | None) -> float | None:
    """ours / anchor (None when either is missing or the anchor is 0)."""
    try:
        if ours is None or anchor is None or float(anchor) == 0.0:
            return None
        return float(ours) / float(anchor)
    except (TypeError, ValueError):
        return None


def advantage_of(ours: float | None, anchor: float | None, better: str) -> float | None:
    """How many times better ours is than the anchor (>1: ours ahead), whatever the unit's direction."""
    r = ratio_of(ours, anchor)
    if r is None or r == 0:
        return None
    return r if better == "higher" else 1.0 / r


def result(figure: str, size: float | int | str, ours: float | None, anchor_name: str | None,
           anchor: float | None, unit: str, better: str | None = None, *, size_unit: str | None = None,
           **extra: Any) -> dict[str, Any]:
    """One row of the contract. ``ratio`` = ours / anchor; ``advantage`` > 1 means ours is ahead."""
    better = better or guess_better(unit, figure)
    if better not in ("higher", "lower"):
        raise ValueError("better must be 'higher' or 'lower'")
    row = {"figure": figure, "size": size, "size_unit": size_unit, "ours": _num(ours), "anchor_name": anchor_name,
           "anchor": _num(anchor), "unit": unit, "better": better, "ratio": _round(ratio_of(ours, anchor)),
           "advantage": _round(advantage_of(ours, anchor, better))}
    row.update(extra)
    return row


def payload(bench: str, results: list[dict], *, params: dict | None = None, notes: Sequence[str] = (),
            machine: dict | None = None, smoke: bool = False) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "bench": bench, "smoke": smoke, "params": params or {},
            "results": results, "notes": list(notes), "machine": machine or machine_info()}


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (tmp + rename), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def emit(bench: str, results: list[dict], out: str | Path | None, **kw: Any) -> dict[str, Any]:
    """Build the payload, write it to ``out`` (when given) and print the Markdown table to stdout."""
    data = payload(bench, results, **kw)
    if out:
        write_json(out, data)
    print(markdown_table(data["results"], bench=bench))
    return data


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _round(v: float | None, digits: int = 4) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}") if abs(v) < 1 else round(v, digits)


# --------------------------------------------------------------------------------------------------
# Normalising what the bench scripts write (they are written by different people)
# --------------------------------------------------------------------------------------------------
_FIGURE_KEYS = ("figure", "name", "metric", "label", "what", "stage", "task")
_OURS_KEYS = ("ours", "ours_value", "value", "synthfactory", "ours_mean", "our", "us")
_ANCHOR_NAME_KEYS = ("anchor_name", "baseline_name", "anchor_tool", "tool", "vs", "against", "reference_name")
_ANCHOR_KEYS = ("anchor", "anchor_value", "baseline", "baseline_value", "reference", "theirs")
_SIZE_KEYS = ("size", "n", "rows", "n_rows", "patients", "resources", "records", "scale", "input_size")
_UNIT_KEYS = ("unit", "units")


def _first(d: dict, keys: Iterable[str], default: Any = None) -> tuple[str | None, Any]:
    for k in keys:
        if k in d and d[k] is not None:
            return k, d[k]
    return None, default


def normalize(raw: Any, bench: str | None = None) -> dict[str, Any]:
    """Bring a per-stage bench output into the contract, tolerating reasonable variations:

    * a bare list of rows, or rows under ``results`` / ``figures`` / ``rows`` / ``records`` / ``benchmarks``;
    * rows keyed ``name``/``metric`` for the figure, ``value`` for ours, ``baseline`` for the anchor,
      ``n``/``rows``/``patients`` for the size;
    * an anchor given as ``{"name": ..., "value": ...}``, as ``{"<tool>": value}``, or a list ``anchors``
      of those (one row per anchor);
    * ``ours`` given as ``{"value": ..., ...}``;
    * missing ``ratio``/``advantage``/``better`` (computed; ``better`` guessed from the unit).

    Rows that cannot be read are kept under ``unreadable`` rather than dropped silently."""
    if isinstance(raw, list):
        raw = {"results": raw}
    if not isinstance(raw, dict):
        return {"bench": bench, "results": [], "unreadable": [repr(raw)[:200]], "machine": None}
    rows_in: list = []
    for key in ("results", "figures", "rows", "records", "benchmarks", "measurements"):
        if isinstance(raw.get(key), list):
            rows_in = raw[key]
            break
        if isinstance(raw.get(key), dict):  # {"figure name": {...}} -> rows
            rows_in = [{"figure": k, **v} if isinstance(v, dict) else {"figure": k, "ours": v}
                       for k, v in raw[key].items()]
            break
    out_rows: list[dict] = []
    unreadable: list[Any] = []
    for row in rows_in:
        try:
            out_rows.extend(_normalize_row(row, raw))
        except (TypeError, ValueError, KeyError, AttributeError):
            unreadable.append(row)
    norm = {k: v for k, v in raw.items() if k not in ("results", "figures", "rows", "records", "benchmarks",
                                                         "measurements")}
    norm.update({"bench": raw.get("bench") or raw.get("name") or bench, "results": out_rows,
                 "machine": raw.get("machine") or raw.get("env") or raw.get("environment")})
    if unreadable:
        norm["unreadable"] = unreadable
    return norm


def _normalize_row(row: dict, parent: dict) -> list[dict]:
    if not isinstance(row, dict):
        raise TypeError("row is not an object")
    _, figure = _first(row, _FIGURE_KEYS)
    if figure is None:
        raise KeyError("figure")
    size_key, size = _first(row, _SIZE_KEYS)
    _, unit = _first(row, _UNIT_KEYS, "")
    _, ours = _first(row, _OURS_KEYS)
    if isinstance(ours, dict):
        ours = _first(ours, ("value", "mean", "median", "seconds", "best"))[1]
    _, anchor_name = _first(row, _ANCHOR_NAME_KEYS)
    anchor_key, anchor = _first(row, _ANCHOR_KEYS)
    anchors: list[tuple[str | None, Any]] = []
    if isinstance(row.get("anchors"), list):
        for a in row["anchors"]:
            if isinstance(a, dict):
                anchors.append((_first(a, ("name", "anchor_name", "tool"))[1],
                                _first(a, ("value", "anchor", "seconds", "mean"))[1]))
    elif isinstance(row.get("anchors"), dict):
        anchors.extend(row["anchors"].items())
    elif isinstance(anchor, dict):
        if any(k in anchor for k in ("value", "name")):
            anchors.append((anchor.get("name") or anchor_name, anchor.get("value")))
        else:
            anchors.extend(anchor.items())
    else:
        anchors.append((anchor_name, anchor))
    better = row.get("better") or row.get("direction")
    if isinstance(better, str):
        better = better.lower()
        better = {"max": "higher", "min": "lower", "higher_is_better": "higher",
                  "lower_is_better": "lower"}.get(better, better)
    if better not in ("higher", "lower"):
        better = "lower" if row.get("lower_is_better") else ("higher" if row.get("higher_is_better")
                                                              else guess_better(unit, str(figure)))
    known = set(_FIGURE_KEYS) | set(_UNIT_KEYS) | set(_OURS_KEYS) | set(_ANCHOR_NAME_KEYS) | set(_ANCHOR_KEYS) \
        | {"anchors", "better", "direction", "ratio", "advantage", "size_unit", size_key or "size"}
    extra = {k: v for k, v in row.items() if k not in known}
    out = []
    for name, value in anchors:
        r = result(str(figure), size if size is not None else "", _num(ours), None if name is None else str(name),
                   _num(value), str(unit or ""), better,
                   size_unit=row.get("size_unit") or (size_key if size_key not in (None, "size", "n") else None),
                   **extra)
        if r["ratio"] is None and len(anchors) == 1 and _num(row.get("ratio")) is not None:
            r["ratio"] = _num(row.get("ratio"))  # a ratio without both values: keep the script's own
            r["advantage"] = _round(r["ratio"] if better == "higher" else 1 / r["ratio"]) if r["ratio"] else None
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        v = float(v)
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
        return f"{v:.2g}"
    return str(v).replace("|", "\\|")


def _size_cell(row: dict) -> str:
    size = row.get("size")
    if isinstance(size, float) and size.is_integer():
        size = int(size)
    s = f"{size:,}" if isinstance(size, int) else fmt(size)
    return f"{s} {row['size_unit']}" if row.get("size_unit") else s


def _ratio_cell(row: dict) -> str:
    r, adv = row.get("ratio"), row.get("advantage")
    if r is None:
        return "–"
    if adv is None:
        return f"{fmt(r)}×"
    tag = "ours ahead" if adv > 1.05 else ("ours behind" if adv < 1 / 1.05 else "even")
    return f"{fmt(r)}× ({tag})"


def markdown_table(rows: list[dict], bench: str | None = None, with_bench: bool = False) -> str:
    """One table: figure, size, ours, anchor (name: value), ratio ours/anchor (who is ahead), unit, better."""
    head = ["figure", "size", "ours", "anchor", "ratio (ours/anchor)", "unit", "better"]
    if with_bench:
        head.insert(0, "bench")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        anchor = f"{fmt(row.get('anchor_name'))}: {fmt(row.get('anchor'))}" if row.get("anchor_name") \
            else fmt(row.get("anchor"))
        cells = [fmt(row.get("figure")), _size_cell(row), fmt(row.get("ours")), anchor, _ratio_cell(row),
                 fmt(row.get("unit")), fmt(row.get("better"))]
        if with_bench:
            cells.insert(0, fmt(row.get("bench") or bench))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(m: dict | None, with_date: bool = True) -> str:
    if not m:
        return "machine: unknown"
    pk = m.get("packages") or {}
    keys = ("synthfactory", "apache-airflow", "sdv", "sdmetrics", "pyarrow", "duckdb", "fhiry", "anonymeter")
    versions = ", ".join(f"{k} {pk[k]}" for k in keys if pk.get(k))
    return (f"{m.get('cpu_model')}, {m.get('cpu_cores_usable')} usable cores, {m.get('ram_gib')} GiB RAM, "
            f"{m.get('os')}, Python {m.get('python')}; {versions}" + (f"; measured {m.get('date')}" if with_date else ""))


def write_markdown(path: str | Path, rows: list[dict], *, title: str, machine: dict | None = None,
                   preface: Sequence[str] = (), footer: Sequence[str] = (), with_bench: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", "", *preface, *([""] if preface else []), f"Machine: {machine_line(machine)}", "",
             markdown_table(rows, with_bench=with_bench), "", *footer]
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Arguments every bench takes
# --------------------------------------------------------------------------------------------------
def parse_sizes(values: Sequence[str] | str | None) -> list[int]:
    """``['1000', '5000']``, ``['1000,5000']`` or ``'1000,5000'`` -> [1000, 5000] (``10k`` / ``2m`` allowed)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    sizes = []
    for v in values:
        for part in str(v).replace(";", ",").split(","):
            part = part.strip().lower().replace("_", "")
            if not part:
                continue
            mult = {"k": 1_000, "m": 1_000_000}.get(part[-1], 1)
            sizes.append(int(float(part[:-1] if mult > 1 else part) * mult))
    return sizes


def standard_args(parser: argparse.ArgumentParser, default_sizes: Sequence[int],
                  smoke_sizes: Sequence[int]) -> argparse.ArgumentParser:
    """Add ``--sizes``, ``--out``, ``--smoke``, ``--seed``, ``--repeat``; use :func:`resolve_sizes` after."""
    parser.add_argument("--sizes", nargs="+", metavar="N",
                        help=f"input sizes (spaces or commas; default {' '.join(map(str, default_sizes))}; "
                             f"--smoke: {' '.join(map(str, smoke_sizes))})")
    parser.add_argument("--out", help="write the JSON result here (the contract in bench/README.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks it runs, not speed")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats per figure (best is kept)")
    parser.set_defaults(_default_sizes=list(default_sizes), _smoke_sizes=list(smoke_sizes))
    return parser


def resolve_sizes(args: argparse.Namespace) -> list[int]:
    if args.sizes:
        return parse_sizes(args.sizes)
    return list(args._smoke_sizes if args.smoke else args._default_sizes)
