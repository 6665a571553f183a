"""Synthesis benchmark: fit and sample seconds per synthesizer, ours against calling SDV directly on the same
table, plus CPU seconds per epoch of the neural kinds and the relational engines' figures.

Standard table: the patient-level modelling table (``synthfactory.synthesize.modelling``) built from the
fixed-seed longitudinal test tables (``synthfactory.synthesize.testdata.relational_tables``); ``--sizes``
are its rows (patients). For every kind we time

* ours: ``engine.fit`` (neural kinds through the resumable epoch trainer, no checkpoints) and
  ``engine.sample_to_parquet`` (batches streamed into Parquet row groups, ids added);
* anchor: the SDV class built and fitted directly (``synth.fit({t: df})``) and ``synth.sample(n)`` into a
  DataFrame written with ``to_parquet``.

The goal is ratio <= 1.1 (our overhead at most 10 %). Relational rows (``--relational-sizes``, patients):
fit and sample seconds of the patient-centred engine against SDV's HMASynthesizer on the same star, with
referential integrity and children-per-parent KS as extra keys. Times are wall seconds of the best of
``--repeat`` runs; torch runs with ``--threads`` threads (2 shared cores here: 1 avoids oversubscription).
GPU figures need a CUDA machine: the rows say ``device``; this file records CPU only unless run on one.

    .venv/bin/python bench/synth_bench.py --sizes 500 2000 8000 --out bench/results/raw/synth.json
    .venv/bin/python bench/synth_bench.py --smoke --out /tmp/synth.json     # < 60 s
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, resolve_sizes, result, standard_args  # noqa: E402

KINDS = ("gaussian_copula", "ctgan", "tvae", "copulagan")
TINY_NEURAL = {"embedding_dim": 16, "generator_dim": (32, 32), "discriminator_dim": (32, 32)}


def standard_table(patients: int, seed: int) -> Any:
    from synthfactory.spec import FeatureSpec, LabFeature
    from synthfactory.synthesize.modelling import KEY, build_modelling_table
    from synthfactory.testing.records import relational_tables

    tables = relational_tables(patients, seed)
    spec = FeatureSpec(top_conditions=4, labs=[LabFeature(name="hba1c", loinc="4548-4"),
                                                LabFeature(name="bmi", loinc="39156-5")],
                       reference_date="2026-01-01", min_patients=2)
    table, _ = build_modelling_table(tables, spec)
    return table.drop(columns=[KEY]), tables


def _params(kind: str, epochs: int, smoke: bool) -> dict:
    if kind == "gaussian_copula":
        return {"default_distribution": "truncnorm"}
    p: dict[str, Any] = {"epochs": epochs, "batch_size": 100 if kind != "tvae" else 100, "enable_gpu": False}
    if smoke:
        p.update(TINY_NEURAL if kind != "tvae" else {"embedding_dim": 16, "compress_dims": (32,),
                                                     "decompress_dims": (32,)})
    return p


def _sdv_class(kind: str) -> Any:
    from sdv.single_table import (CopulaGANSynthesizer, CTGANSynthesizer, GaussianCopulaSynthesizer,
                                  TVAESynthesizer)

    return {"gaussian_copula": GaussianCopulaSynthesizer, "ctgan": CTGANSynthesizer, "tvae": TVAESynthesizer,
            "copulagan": CopulaGANSynthesizer}[kind]


SAMPLE_DRAWS = 5


def bench_single(kind: str, df: Any, sample_rows: int, epochs: int, seed: int, smoke: bool, repeat: int,
                 tmp: str) -> dict:
    import numpy as np
    import torch
    from sdv.metadata import Metadata

    from synthfactory.storage import Store
    from synthfactory.synthesize import engine
    from synthfactory.synthesize.training import TrainPlan

    meta = engine.metadata_dict(df)
    params = _params(kind, epochs, smoke)
    best: dict[str, float] = {}
    info: dict = {}
    with warnings.catch_warnings():  # warm-up (imports, first-call caches) outside the timings, both sides
        warnings.simplefilter("ignore")
        warm = df.head(60)
        warm_ours, _ = engine.fit(warm, kind, {**params, "epochs": 1} if kind in engine.NEURAL else params, meta)
        warm_sdv = _sdv_class(kind)(Metadata.load_from_dict(meta), **({**params, "epochs": 1}
                                                                     if kind in engine.NEURAL else params))
        warm_sdv.fit({"patients": warm})
        # first sample + Parquet write of the process (codec and writer set-up), both sides
        engine.sample_to_parquet(warm_ours, 50, os.path.join(tmp, "warm-ours.parquet"), Store())
        out = warm_sdv.sample(num_rows=50)
        (out["patients"] if isinstance(out, dict) else out).to_parquet(os.path.join(tmp, "warm-sdv.parquet"))
    for r in range(repeat):
        # ours
        np.random.seed(seed)
        torch.manual_seed(seed)
        plan = TrainPlan(epochs=epochs, seed=seed) if kind in engine.NEURAL else None
        t0, c0 = time.perf_counter(), time.process_time()
        synth, _ = engine.fit(df, kind, params, meta, plan=plan)
        fit_ours, fit_ours_cpu = time.perf_counter() - t0, time.process_time() - c0
        if plan is not None:
            info = plan.info
        # SDV directly
        np.random.seed(seed)
        torch.manual_seed(seed)
        direct = _sdv_class(kind)(Metadata.load_from_dict(meta), **params)
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            direct.fit({"patients": df})
        fit_sdv, fit_sdv_cpu = time.perf_counter() - t0, time.process_time() - c0
        # sampling takes a fraction of a second: the best of SAMPLE_DRAWS draws per side, interleaved, so that
        # a noisy neighbour on the shared cores does not decide the ratio
        sample_ours = sample_ours_cpu = sample_sdv = sample_sdv_cpu = float("inf")
        for d in range(SAMPLE_DRAWS):
            t0, c0 = time.perf_counter(), time.process_time()
            engine.sample_to_parquet(synth, sample_rows, os.path.join(tmp, f"ours-{kind}-{r}-{d}.parquet"), Store(),
                                     batch_size=100_000)  # the stage's default batch (one batch up to 100k rows)
            sample_ours = min(sample_ours, time.perf_counter() - t0)
            sample_ours_cpu = min(sample_ours_cpu, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = direct.sample(num_rows=sample_rows)
            out = out["patients"] if isinstance(out, dict) else out
            out.to_parquet(os.path.join(tmp, f"sdv-{kind}-{r}-{d}.parquet"))
            sample_sdv = min(sample_sdv, time.perf_counter() - t0)
            sample_sdv_cpu = min(sample_sdv_cpu, time.process_time() - c0)
        for k, v in (("fit_ours", fit_ours), ("fit_sdv", fit_sdv), ("sample_ours", sample_ours),
                     ("sample_sdv", sample_sdv), ("fit_ours_cpu", fit_ours_cpu), ("fit_sdv_cpu", fit_sdv_cpu),
                     ("sample_ours_cpu", sample_ours_cpu), ("sample_sdv_cpu", sample_sdv_cpu)):
            best[k] = min(best.get(k, float("inf")), v)
    return {**best, "info": info}


def bench_relational(patients: int, seed: int, smoke: bool, with_hma: bool, par_epochs: int) -> list[dict]:
    from synthfactory.synthesize import relational
    from synthfactory.testing.records import relational_tables

    tables = relational_tables(patients, seed)
    rows = []
    engines = ["patient_centred"] + (["hma"] if with_hma else []) + (["par"] if par_epochs else [])
    for eng in engines:
        t0 = time.perf_counter()
        model = relational.fit(tables, engine=eng, root_params={"default_distribution": "truncnorm"},
                               par_epochs=par_epochs or 1)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        syn, fixes = relational.sample(model, patients, seed=seed)
        sample_s = time.perf_counter() - t0
        rows.append({"engine": eng, "fit": fit_s, "sample": sample_s,
                     "ri": min(relational.referential_integrity(syn).values()),
                     "ks": {k: v["ks"] for k, v in relational.children_ks(tables, syn).items()},
                     "violations": sum(relational.constraint_violations(syn).values()),
                     "rows": {k: len(v) for k, v in syn.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(parser, default_sizes=(500, 2000, 8000), smoke_sizes=(120,))
    parser.add_argument("--kinds", default=None, help=f"comma list (default {','.join(KINDS)}; smoke: "
                                                      "gaussian_copula,ctgan; none = relational rows only)")
    parser.add_argument("--epochs", type=int, default=None, help="neural epochs (default 20; smoke 2)")
    parser.add_argument("--sample-rows", type=int, default=None, help="rows to sample (default 4x the size)")
    parser.add_argument("--relational-sizes", default=None, help="patients for the relational rows (comma list; "
                                                                 "default 300; smoke 30; 0 = none)")
    parser.add_argument("--hma", action=argparse.BooleanOptionalAction, default=None,
                        help="also time SDV HMA on the relational star (default on, off in smoke)")
    parser.add_argument("--par-epochs", type=int, default=None, help="also time the PAR engine with this many "
                                                                     "epochs (default 0 = off)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    sizes = resolve_sizes(args)
    smoke = args.smoke
    repeat = args.repeat or (1 if smoke else 2)
    kinds = [k for k in (args.kinds or ("gaussian_copula,ctgan" if smoke else ",".join(KINDS))).split(",")
             if k and k != "none"]
    epochs = args.epochs or (2 if smoke else 20)
    rel_sizes = [int(x) for x in (args.relational_sizes or ("30" if smoke else "300")).split(",") if int(x) > 0]
    with_hma = (not smoke) if args.hma is None else args.hma
    par_epochs = args.par_epochs or 0

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows: list[dict] = []
    notes = [f"torch threads={args.threads}; device=cpu (no CUDA here: GPU seconds/epoch are for a GPU session)",
             "anchor = the same SDV class fitted/sampled directly on the same table; goal ratio <= 1.1",
             "wall seconds (best of --repeat); cpu_ours/cpu_anchor/cpu_ratio = process CPU seconds, steadier on a "
             "shared machine"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            df, _ = standard_table(n, args.seed)
            sample_rows = args.sample_rows or 4 * n
            for kind in kinds:
                r = bench_single(kind, df, sample_rows, epochs, args.seed, smoke, repeat, tmp)
                extra = {"kind": kind, "columns": int(df.shape[1])}
                cpu = {"cpu_ours": round(r["fit_ours_cpu"], 3), "cpu_anchor": round(r["fit_sdv_cpu"], 3),
                       "cpu_ratio": round(r["fit_ours_cpu"] / max(r["fit_sdv_cpu"], 1e-9), 3)}
                rows.append(result(f"fit {kind}", n, r["fit_ours"], "SDV direct", r["fit_sdv"], "s", "lower",
                                   size_unit="rows", **extra, **cpu,
                                   epochs=epochs if kind != "gaussian_copula" else None))
                cpu = {"cpu_ours": round(r["sample_ours_cpu"], 3), "cpu_anchor": round(r["sample_sdv_cpu"], 3),
                       "cpu_ratio": round(r["sample_ours_cpu"] / max(r["sample_sdv_cpu"], 1e-9), 3)}
                rows.append(result(f"sample {kind}", n, r["sample_ours"], "SDV direct", r["sample_sdv"], "s",
                                   "lower", size_unit="rows", sample_rows=sample_rows, **extra, **cpu))
                if r["info"]:
                    rows.append(result(f"CPU s/epoch {kind}", n, r["info"]["cpu_seconds_per_epoch"], None, None,
                                       "s", "lower", size_unit="rows", device=r["info"]["device"],
                                       wall_seconds_per_epoch=r["info"]["seconds_per_epoch"], **extra))
        for p in rel_sizes:
            rel = bench_relational(p, args.seed, smoke, with_hma, par_epochs)
            hma = next((r for r in rel if r["engine"] == "hma"), None)
            for r in rel:
                if r["engine"] == "hma":
                    continue
                extra = {"engine": r["engine"], "referential_integrity": r["ri"], "children_ks": r["ks"],
                         "constraint_violations": r["violations"], "rows_by_table": r["rows"]}
                name = "relational" if r["engine"] == "patient_centred" else f"relational {r['engine']}"
                rows.append(result(f"{name} fit", p, r["fit"], "SDV HMA" if hma else None,
                                   hma["fit"] if hma else None, "s", "lower", size_unit="patients", **extra))
                rows.append(result(f"{name} sample", p, r["sample"], "SDV HMA" if hma else None,
                                   hma["sample"] if hma else None, "s", "lower", size_unit="patients", **extra))
            if hma:
                notes.append(f"HMA at {p} patients: RI {hma['ri']}, children KS {hma['ks']}, "
                             f"violations {hma['violations']}")
    emit("synth", rows, args.out, smoke=smoke,
         params={"sizes": sizes, "seed": args.seed, "repeat": repeat, "kinds": kinds, "epochs": epochs,
                 "relational_sizes": rel_sizes, "hma": with_hma, "par_epochs": par_epochs, "threads": args.threads},
         notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
