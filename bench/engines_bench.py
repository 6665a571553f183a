"""Synthesis engines side by side on our own patient table: does MOSTLY AI's TabularARGN (``tabular_argn``,
run in its own interpreter) hold up against SDV's GaussianCopula on the cohort the demo models?

For each cohort size, the sample extract (carebundle, seed 7) is ingested and prepared once; then each engine
is fitted on the same train split, samples as many rows, and the quality and privacy stages measure the
result exactly as a DAG run would (SDMetrics quality score and column-pair trends, TSTR/TRTR utility on the
real holdout, size-adjusted DCR share, membership-inference AUC). Quality figures are "higher is better",
fit time is seconds; the anchor of each figure is GaussianCopula on the same split.

    .venv/bin/python bench/engines_bench.py --sizes 600 3000 [--kinds gaussian_copula,tabular_argn]

Needs ``make argn-venv``. Figures, not timings, are the point here; the fit times are single runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, resolve_sizes, result, standard_args  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
FIGURES = (("quality_score", "quality", "SDMetrics quality score"),
           ("column_pair_trends", "quality", "column pair trends"),
           ("utility_ratio", "quality", "TSTR/TRTR utility ratio"),
           ("dcr_share", "privacy", "DCR share (0.5 ideal)"),
           ("mia_auc", "privacy", "membership-inference AUC (0.5 ideal)"))


def run(patients: int, kinds: list[str], epochs: int | None, seed: int) -> dict[str, dict]:
    from synthfactory import pipeline as p
    from synthfactory.testing.dev import generate_sample_extract
    from synthfactory.spec import load_spec

    extract = generate_sample_extract(CACHE / f"carebundle_p{patients}_s7", patients=patients, seed=7)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="engines-bench-") as tmp:
        spec = load_spec(ROOT / "include" / "datasets" / "cohort_demo.yaml")
        base = p.RunContext(spec=spec, run_id="prep", version="v0", source_uri=str(extract), staging_root=tmp)
        ingested = p.ingest(base)
        prepared = p.prepare(base, ingested)
        for kind in kinds:
            ctx = p.RunContext(spec=spec, run_id="prep", version="v0", source_uri=str(extract), staging_root=tmp,
                               synthesizer=kind, epochs=epochs if kind != "gaussian_copula" else None)
            t0 = time.perf_counter()
            fitted = p.fit(ctx, prepared)
            fit_s = time.perf_counter() - t0
            sampled = p.sample(ctx, fitted, prepared)
            q = p.quality(ctx, prepared, sampled)
            pr = p.privacy(ctx, prepared, sampled, ingested, q)
            out[kind] = {"fit_seconds": fit_s, "epochs": fitted.get("epochs"), "device": fitted.get("device"),
                         "rows_train": prepared["rows_train"], "quality": q, "privacy": pr}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(parser, default_sizes=(600, 3000), smoke_sizes=(60,))
    parser.add_argument("--kinds", default="gaussian_copula,tabular_argn")
    parser.add_argument("--epochs", type=int, default=None, help="tabular_argn max epochs (default: its own, "
                                                                    "100 with early stopping; smoke 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    kinds = [k for k in args.kinds.split(",") if k]
    epochs = args.epochs or (1 if args.smoke else None)
    rows: list[dict] = []
    for n in resolve_sizes(args):
        r = run(n, kinds, epochs, args.seed)
        anchor = r.get("gaussian_copula")
        for kind, got in r.items():
            if kind == "gaussian_copula":
                continue
            extra = {"kind": kind, "rows_train": got["rows_train"], "epochs": got["epochs"], "device": got["device"]}
            rows.append(result(f"fit seconds {kind}", n, got["fit_seconds"], "GaussianCopula",
                               anchor["fit_seconds"] if anchor else None, "s", "lower", size_unit="patients",
                               **extra))
            for key, stage, label in FIGURES:
                better = "lower" if key == "mia_auc" else "higher"
                if key == "dcr_share":
                    better = "lower"
                rows.append(result(f"{label} {kind}", n, got[stage].get(key), "GaussianCopula",
                                   anchor[stage].get(key) if anchor else None, "score", better,
                                   size_unit="patients", **extra))
    emit("engines", rows, args.out, params={"sizes": resolve_sizes(args), "kinds": kinds, "epochs": epochs,
                                            "command": "bench/engines_bench.py " + " ".join(argv or sys.argv[1:])},
         notes=["same train split, same sample size, same quality/privacy stages as a DAG run",
                "dcr_share and mia_auc: closer to 0.5 is better; 'lower' marks the direction away from copying"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
