"""Quality stage: synthfactory's whole quality stage against SDMetrics' QualityReport alone, on the same data.

The stage (``synthfactory.pipeline.quality``) runs, per call: the derived GX 1.x suite on the synthetic
table with Data Docs HTML written to staging, SDMetrics' QualityReport (Column Shapes + Column Pair
Trends, which the stage reuses for the per-column and per-pair fidelity), the correlation matrices, the
spec's clinical relationships, and TSTR/TRTR utility with scikit-learn HistGradientBoosting (two fits on
the real train / synthetic tables, scored on the real holdout). The anchor is what a user would run
otherwise: ``sdmetrics.reports.single_table.QualityReport().generate(real, synthetic, metadata)`` on the
same real and synthetic tables. The goal is a ratio of at most 2x.

Data: :func:`synthfactory.quality.testdata.cohort_table` (the demo modelling table's 19 columns, with
known clinical relationships), fixed seeds: real train = N rows (seed), real holdout = N/4 rows (seed+1),
synthetic = N rows (seed+2, an ideal synthesizer). Files go through a local staging folder, as in a run;
the stage's timing includes reading them and writing its reports.

    .venv/bin/python bench/quality_bench.py --sizes 10000 50000 100000 --out bench/results/raw/quality.json
    .venv/bin/python bench/quality_bench.py --smoke --out /tmp/quality_smoke.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, resolve_sizes, result, standard_args  # noqa: E402

DEFAULT_SIZES = (10_000, 50_000, 100_000)
SMOKE_SIZES = (1_500,)
GOAL_RATIO = 2.0


def _spec(staging: Path) -> Any:
    import yaml

    from synthfactory.testing.cohorts import RELATIONSHIPS, UTILITY
    from synthfactory.spec import parse_spec

    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data["name"] = "quality_bench"
    data["staging"]["uri"] = str(staging)
    data["quality"]["relationships"] = RELATIONSHIPS
    data["quality"]["utility"] = UTILITY
    return parse_spec(data)


def _prepare(n: int, seed: int, staging: Path) -> tuple[Any, dict, dict, Any]:
    """Write the real train / holdout / metadata and the synthetic table into a run's staging folder."""
    from synthfactory.pipeline import RunContext
    from synthfactory.testing.cohorts import cohort_table
    from synthfactory.synthesize.engine import SYNTHETIC_ID, metadata_dict
    from synthfactory.synthesize.modelling import KEY

    ctx = RunContext(spec=_spec(staging), run_id=f"bench_{n}", version="v0", base_dir=str(staging))
    train = cohort_table(n, seed, key=KEY)
    holdout = cohort_table(max(n // 4, 50), seed + 1, key=KEY)
    synthetic = cohort_table(n, seed + 2, key=SYNTHETIC_ID)
    prepared = {"train_uri": ctx.uri("model", "train.parquet"), "holdout_uri": ctx.uri("model", "holdout.parquet"),
                "metadata_uri": ctx.uri("model", "metadata.json"), "rows_train": n}
    ctx.store.write_df(prepared["train_uri"], train)
    ctx.store.write_df(prepared["holdout_uri"], holdout)
    ctx.store.write_json(prepared["metadata_uri"], metadata_dict(train, exclude=(KEY,)))
    sampled = {"synthetic_uri": ctx.uri("synthetic", "patients.parquet"), "rows": n}
    ctx.store.write_df(sampled["synthetic_uri"], synthetic)
    anchor_input = (train.drop(columns=[KEY]), synthetic.drop(columns=[SYNTHETIC_ID]),
                    ctx.store.read_json(prepared["metadata_uri"])["tables"]["patients"])
    return ctx, prepared, sampled, anchor_input


def _sdmetrics_report(real: Any, synthetic: Any, metadata: dict) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sdmetrics.reports.single_table import QualityReport

        report = QualityReport()
        report.generate(real, synthetic, metadata, verbose=False)
    return float(report.get_score())


def _timed(fn: Any, repeat: int) -> tuple[float, float, Any]:
    """Best wall seconds and best process CPU seconds (all threads) of ``repeat`` runs, and the last value."""
    wall, cpu, value = float("inf"), float("inf"), None
    for _ in range(max(1, repeat)):
        w0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, value


def main(argv: list[str] | None = None) -> int:
    ap = standard_args(argparse.ArgumentParser(description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter),
                       DEFAULT_SIZES, SMOKE_SIZES)
    args = ap.parse_args(argv)
    sizes = resolve_sizes(args)
    repeat = 1 if args.smoke else (args.repeat or 1)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("SYNTHFACTORY_PROGRESS_SECONDS", "0")
    logging.basicConfig(level=logging.WARNING)

    from synthfactory import pipeline

    # warm the heavy imports and first-call set-up of GX, SDMetrics and scikit-learn outside the timings
    import sklearn.ensemble  # noqa: F401

    from synthfactory.quality.expectations import derive_suite, run_suite
    from synthfactory.testing.cohorts import cohort_table
    from synthfactory.synthesize.engine import metadata_dict

    warm = cohort_table(200, 0, key=None)
    run_suite(derive_suite(warm, name="warm"), warm)
    _sdmetrics_report(warm, warm, metadata_dict(warm)["tables"]["patients"])

    rows: list[dict] = []
    notes = [f"goal: quality stage <= {GOAL_RATIO}x SDMetrics QualityReport on the same data",
             "ours = synthfactory.pipeline.quality (GX suite + Data Docs, SDMetrics QualityReport, correlations, "
             "3 relationships, TSTR/TRTR utility with 2 HistGradientBoosting fits capped at 25k rows); "
             "anchor = SDMetrics QualityReport.generate alone",
             f"best of {repeat} run(s) per size; seeds {args.seed}, {args.seed + 1}, {args.seed + 2}",
             "CPU time = process CPU seconds over all threads (robust when other jobs share the machine; the "
             "stage trains its utility models in a worker thread, so its wall time can be below its CPU time)"]
    details = []
    with tempfile.TemporaryDirectory(prefix="sf-quality-bench-") as tmp:
        for n in sizes:
            ctx, prepared, sampled, (real, synthetic, metadata) = _prepare(n, args.seed, Path(tmp) / str(n))
            anchor_s, anchor_cpu, anchor_score = _timed(lambda: _sdmetrics_report(real, synthetic, metadata), repeat)
            ours_s, ours_cpu, summary = _timed(lambda: pipeline.quality(ctx, prepared, sampled), repeat)
            for figure, ours, anchor in (("quality stage wall time", ours_s, anchor_s),
                                         ("quality stage CPU time", ours_cpu, anchor_cpu)):
                rows.append(result(figure, n, ours, "SDMetrics QualityReport", anchor, "s", "lower",
                                   size_unit="rows", goal_ratio=GOAL_RATIO,
                                   meets_goal=bool(anchor and ours / anchor <= GOAL_RATIO)))
            details.append({"rows": n, "stage_seconds": round(ours_s, 3), "sdmetrics_seconds": round(anchor_s, 3),
                            "stage_cpu_seconds": round(ours_cpu, 3), "sdmetrics_cpu_seconds": round(anchor_cpu, 3),
                            "stage_quality_score": summary["quality_score"],
                            "sdmetrics_quality_score": round(anchor_score, 4),
                            "expectation_success_ratio": summary["expectation_success_ratio"],
                            "utility_ratio": summary["utility_ratio"],
                            "relationships": {k: v["status"] for k, v in summary["relationships"].items()}})
            print(f"rows={n}: stage {ours_s:.2f}s wall / {ours_cpu:.2f}s CPU, SDMetrics QualityReport "
                  f"{anchor_s:.2f}s / {anchor_cpu:.2f}s (ratios {ours_s / anchor_s:.2f} / {ours_cpu / anchor_cpu:.2f}); "
                  f"scores {summary['quality_score']} / {anchor_score:.4f}", file=sys.stderr)
    emit("quality", rows, args.out, params={"sizes": sizes, "seed": args.seed, "repeat": repeat,
                                             "details": details},
         notes=notes, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
