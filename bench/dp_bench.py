"""Differential privacy on the demo extract: synthfactory's dp_mst / dp_aim against smartnoise-synth's own MST and
AIM called directly on the same rows, at ε = 1, 3 and 10, every figure beside the real-data reference.

The demo extract (``data/sample_extract``) is ingested and prepared once with the demo spec, as a DAG run would:
the real train split is what every synthesizer sees, the real holdout scores utility, and the real-data reference
(real held-out rows vs real train rows over re-splits, from prepare) is the ceiling. For each candidate and ε the
synthesizer fits the train split and samples as many rows; reported:

* quality score, column pair trends and worst eligible column at the reference's row count (the gate's matched
  figures, :func:`synthfactory.quality.reference.matched_figures`), and as fractions of the reference;
* TSTR/TRTR utility ratio (AUC of the type 2 diabetes flag on the real holdout);
* fit seconds (CPU, one process).

Candidates:

* ``synthfactory dp_* (DP bounds)``: :class:`~synthfactory.synthesize.dp.DPSynthesizer` as a spec with no
  ``dp.bounds`` gets it: bounds of every numeric column but age estimated with 25 % of ε, data-independent bins;
* ``synthfactory dp_* (public bounds)``: the same with clinical plausibility ranges as public bounds (no ε spent);
* ``smartnoise direct (inferred bounds)``: ``Synthesizer.create(mech).fit(df, preprocessor_eps=0.25 ε,
  continuous_columns=..., categorical_columns=...)``, as smartnoise's documentation shows;
* ``smartnoise direct (public bounds)``: smartnoise's ``TableTransformer`` with ``BinTransformer(bins=10,
  lower, upper)`` over the same public ranges (the configuration issue #18 measured: quality 0.57).

    .venv/bin/python bench/dp_bench.py                       # MST at ε 1, 3, 10; AIM at ε 3
    .venv/bin/python bench/dp_bench.py --eps 3 --aim-eps     # quick: MST at ε 3 only, no AIM
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_info, write_json  # noqa: E402

SPEC = ROOT / "include" / "datasets" / "cohort_demo.yaml"
PUBLIC = {"age": (0, 90), "n_encounters": (0, 200), "n_conditions": (0, 100), "hba1c": (3, 20), "bmi": (10, 80),
          "systolic_bp": (60, 250), "ldl": (20, 400), "egfr": (0, 200), "glucose": (30, 600)}
TARGET = "cond_t2_diabetes"


def prepare(extract: Path, work: Path) -> dict:
    import yaml

    from synthfactory import pipeline
    from synthfactory.spec import load_spec

    data = yaml.safe_load(SPEC.read_text())
    data["source"]["uri"] = str(extract)
    data["staging"]["uri"] = str(work / "staging")
    path = work / "cohort_demo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    ctx = pipeline.RunContext(spec=load_spec(path), run_id="dp_bench", version="v1")
    prepared = pipeline.prepare(ctx, pipeline.ingest(ctx))
    s = ctx.store
    return {"train": s.read_df(prepared["train_uri"]).drop(columns=["patient_key"]),
            "holdout": s.read_df(prepared["holdout_uri"]).drop(columns=["patient_key"]),
            "metadata": s.read_json(prepared["metadata_uri"]), "reference": s.read_json(prepared["reference_uri"])}


def ours(kind: str, eps: float, public: bool) -> Callable:
    def run(train):
        from synthfactory.synthesize.dp import DPSynthesizer

        synth = DPSynthesizer(kind, epsilon=eps, bounds=PUBLIC if public else None)
        synth.reseed(7)
        synth.fit(train)
        return synth.sample(len(train)), synth.privacy["epsilon_bounds"]
    return run


def smartnoise(mech: str, eps: float, public: bool) -> Callable:
    def run(train):
        import pandas as pd
        from snsynth import Synthesizer
        from snsynth.transform import BinTransformer, LabelTransformer, TableTransformer

        df = train.copy()
        nums = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
        cats = [c for c in df.columns if c not in nums]
        for c in cats:
            df[c] = df[c].astype(object).where(df[c].notna(), None)
        n = len(df)
        synth = Synthesizer.create(mech, epsilon=eps, delta=1.0 / (n * math.sqrt(n)))
        with contextlib.redirect_stdout(io.StringIO()):
            if public:
                tt = TableTransformer([BinTransformer(bins=10, lower=PUBLIC[c][0], upper=PUBLIC[c][1],
                                                      nullable=bool(df[c].isna().any())) if c in nums
                                       else LabelTransformer(nullable=bool(df[c].isna().any())) for c in df.columns])
                synth.fit(df, transformer=tt, preprocessor_eps=0.0)
                pre = 0.0
            else:
                pre = 0.25 * eps
                synth.fit(df, preprocessor_eps=pre, categorical_columns=cats, continuous_columns=nums)
            out = synth.sample(n)
        out = pd.DataFrame(out, columns=df.columns) if not isinstance(out, pd.DataFrame) else out
        for c in df.columns:  # back to the real column types (smartnoise returns bin midpoints as floats)
            if str(train[c].dtype).startswith("int") and out[c].notna().all():
                out[c] = out[c].astype(float).round().astype(train[c].dtype)
            elif str(train[c].dtype) == "bool":
                out[c] = out[c].astype(bool)
        return out[list(train.columns)], pre
    return run


def score(name: str, eps: float, fn: Callable, real: dict) -> dict:
    from synthfactory.quality.reference import matched_figures
    from synthfactory.quality.utility import ml_utility

    row: dict[str, Any] = {"candidate": name, "epsilon": eps}
    t0 = time.process_time()
    try:
        synthetic, pre = fn(real["train"])
    except Exception as err:  # noqa: BLE001 - a failure is a result here
        row.update({"status": "failed", "error": f"{type(err).__name__}: {str(err)[:160]}"})
        logging.warning("%s ε=%s failed: %s", name, eps, traceback.format_exc(limit=2))
        return row
    row["fit_sample_cpu_s"] = round(time.process_time() - t0, 1)
    ref = real["reference"]
    m = matched_figures(real["train"], synthetic, metadata=real["metadata"], rows=ref["rows_holdout"],
                        eligible=ref["eligible_columns"], repeats=2, seed=0)
    u = ml_utility(real["train"], real["holdout"], synthetic, target=TARGET, seed=0)
    for k in ("quality_score", "column_pair_trends", "min_column_score"):
        v = (m.get(k) or {}).get("mean")
        row[k] = None if v is None else round(v, 4)
        r = (ref.get(k) or {}).get("mean")
        row[k + "_of_ref"] = None if v is None or not r else round(v / r, 3)
    row.update({"status": "ok", "epsilon_bounds": round(pre, 4), "utility_ratio": u.get("ratio") and round(u["ratio"], 3),
                "tstr": u.get("tstr") and round(u["tstr"], 3)})
    return row


def markdown(rows: list[dict], ref: dict, trtr: float | None, meta: dict) -> str:
    r = {k: (ref.get(k) or {}).get("mean") for k in ("quality_score", "column_pair_trends", "min_column_score")}
    lines = ["# DP synthesis on the demo extract: synthfactory vs smartnoise-synth direct", "",
             f"One run, {meta['date']} on {meta['cpu']}; smartnoise-synth {meta['smartnoise']}. Train "
             f"{meta['rows_train']} rows, holdout {meta['rows_holdout']}, figures at the reference's row count "
             f"({ref['rows_holdout']}). Command: `{meta['command']}`.", "",
             f"Real-data reference (real held-out rows vs real train rows, {ref['resplits']} re-splits): quality "
             f"{r['quality_score']:.3f}, pair trends {r['column_pair_trends']:.3f}, worst eligible column "
             f"{r['min_column_score']:.3f}; TRTR AUC ({TARGET}) {trtr if trtr is None else round(trtr, 3)}.", "",
             "| candidate | ε | quality (of ref) | pair trends (of ref) | worst column (of ref) | TSTR/TRTR | "
             "ε on bounds | fit+sample CPU s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['candidate']} | {row['epsilon']:g} | failed: {row['error']} | | | | | |")
            continue

        def f(k: str) -> str:
            return f"{row[k]:.3f} ({row[k + '_of_ref']:.2f})" if row[k] is not None else "—"

        lines.append(f"| {row['candidate']} | {row['epsilon']:g} | {f('quality_score')} | {f('column_pair_trends')}"
                     f" | {f('min_column_score')} | {row['utility_ratio']} | {row['epsilon_bounds']:g} | "
                     f"{row['fit_sample_cpu_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extract", default=str(ROOT / "data" / "sample_extract"))
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 10.0], help="ε of the MST candidates")
    ap.add_argument("--aim-eps", type=float, nargs="*", default=[3.0], help="ε of the AIM candidates (none: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dp.md"))
    ap.add_argument("--only", nargs="*", default=[], help="run only candidates whose name contains one of these "
                                                        "(e.g. smartnoise), for a second process beside the first")
    ap.add_argument("--merge", nargs="*", default=[], help="JSON outputs of processes run side by side (--only): "
                                                         "write their rows as one table to --out, and exit")
    args = ap.parse_args()
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out))
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="sf-dp-bench-") as tmp:
        real = prepare(Path(args.extract), Path(tmp))
        from synthfactory.quality.utility import ml_utility

        trtr = ml_utility(real["train"], real["holdout"], real["train"], target=TARGET, seed=0).get("trtr")
        rows = []
        plan = [(eps, "mst", "dp_mst") for eps in args.eps] + [(eps, "aim", "dp_aim") for eps in args.aim_eps]
        for eps, mech, kind in plan:
            for name, fn in ((f"synthfactory {kind} (DP bounds)", ours(kind, eps, False)),
                             (f"synthfactory {kind} (public bounds)", ours(kind, eps, True)),
                             (f"smartnoise {mech.upper()} direct (inferred bounds)", smartnoise(mech, eps, False)),
                             (f"smartnoise {mech.upper()} direct (public bounds, 10 bins)",
                              smartnoise(mech, eps, True))):
                if args.only and not any(o in name for o in args.only):
                    continue
                row = score(name, eps, fn, real)
                rows.append(row)
                print({k: row.get(k) for k in ("candidate", "epsilon", "status", "quality_score", "column_pair_trends",
                                               "min_column_score", "utility_ratio", "fit_sample_cpu_s", "error")},
                      flush=True)
                _write(Path(args.out), rows, real, trtr)  # after every row: a long run keeps what it measured
        print(Path(args.out).read_text())
    return 0


def merge(parts: list[Path], out: Path) -> int:
    """One table from the JSON of processes started side by side on the same machine (same extract, same
    deterministic prepare: the same split and reference), ordered by ε then candidate."""
    import json

    docs = [json.loads(p.read_text()) for p in parts]
    order = ["synthfactory dp_mst (DP bounds)", "synthfactory dp_mst (public bounds)",
             "smartnoise MST direct (inferred bounds)", "smartnoise MST direct (public bounds, 10 bins)"]
    rows = sorted((r for d in docs for r in d["rows"]),
                  key=lambda r: (r["epsilon"], order.index(r["candidate"]) if r["candidate"] in order else 99))
    meta = {**docs[0]["meta"], "command": "; ".join(sorted({d["meta"]["command"] for d in docs}))}
    text = markdown(rows, docs[0]["reference"], docs[0]["trtr"], meta)
    text = text.replace("One run, ", f"Processes started side by side on one machine ({len(parts)} JSON parts in "
                                      "bench/results/raw/dp/; same extract, same deterministic prepare: one split, one "
                                      "reference), from ", 1)
    out.write_text(text)
    write_json(out.with_suffix(".json"), {"meta": meta, "reference": docs[0]["reference"], "trtr": docs[0]["trtr"],
                                          "rows": rows, "merged_from": [p.name for p in parts]})
    print(out.read_text())
    return 0


def _write(out: Path, rows: list[dict], real: dict, trtr: float | None) -> None:
    from importlib.metadata import version

    info = machine_info()
    meta = {"date": info.get("date"), "cpu": info.get("cpu_model"), "smartnoise": version("smartnoise-synth"),
            "rows_train": len(real["train"]), "rows_holdout": len(real["holdout"]),
            "command": "python bench/dp_bench.py " + " ".join(sys.argv[1:])}
    out.write_text(markdown(rows, real["reference"], trtr, meta))
    write_json(out.with_suffix(".json"), {"meta": meta, "reference": {k: real["reference"].get(k) for k in (
        "quality_score", "column_pair_trends", "min_column_score", "rows_holdout", "resplits")},
        "trtr": trtr, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
