"""TabularARGN (``mostlyai-engine``) fit and sample, run by its own interpreter.

``mostlyai-engine`` cannot share an environment with Airflow 3.3 (it pins ``psutil < 6``; the Task SDK
needs ``>= 6.1``), so the engine adapter (:mod:`synthfactory.synthesize.argn`) runs this file with the
interpreter of an isolated virtual environment (``make argn-venv``; on the GPU worker image,
``/opt/argn/bin/python``), the way Airflow's ``@task.external_python`` does, exchanging Parquet files.
It imports nothing from synthfactory (that package is not installed there) and only the standard
library, pandas and mostlyai-engine.

    python argn_worker.py fit --train train.parquet --workspace WS [--epochs N] [--max-minutes M]
                              [--seed S] [--device auto|cpu|cuda] [--batch-size B] [--model MOSTLY_AI/Medium]
    python argn_worker.py sample --workspace WS --rows N --out synthetic.parquet [--seed S] [--device ...]

``fit`` leaves only the model in the workspace (``ModelStore`` and the column metadata in
``OriginalData/tgt-meta``): the split and encoded copies of the real training rows are deleted before
it returns, so the model archive carries no real rows. Both commands print one JSON line with figures
(never data) on stdout as their last line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REAL_DATA = (("OriginalData", "tgt-data"), ("OriginalData", "encoded-data"), ("OriginalData", "ctx-data"),
             ("SyntheticData",))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("argn worker: --device cuda but CUDA is not available to this interpreter")
    return name


def _progress(prefix: str):  # noqa: ANN202 - mostlyai's ProgressCallback protocol
    last = [0.0]

    def update(total: int | None = None, completed: int | None = None, advance: int | None = None,
               message: dict | None = None, **_: object) -> None:
        now = time.monotonic()
        if message and now - last[0] >= 2.0:  # one line every 2 s at most
            last[0] = now
            figures = {k: v for k, v in message.items() if isinstance(v, (int, float, str))}
            print(f"{prefix} progress {json.dumps(figures, default=str)}", file=sys.stderr, flush=True)

    return update


def fit(a: argparse.Namespace) -> dict:
    import pandas as pd
    from mostlyai import engine

    ws = Path(a.workspace)
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    df = pd.read_parquet(a.train)
    device = _device(a.device)
    engine.set_random_state(a.seed)
    t0 = time.perf_counter()
    engine.split(tgt_data=df, model_type="TABULAR", workspace_dir=ws)
    engine.analyze(value_protection=a.value_protection, workspace_dir=ws)
    engine.encode(workspace_dir=ws)
    t1 = time.perf_counter()
    engine.train(model=a.model, max_epochs=a.epochs, max_training_time=a.max_minutes, batch_size=a.batch_size,
                 device=device, workspace_dir=ws, update_progress=_progress("fit"))
    seconds = time.perf_counter() - t0
    for parts in REAL_DATA:  # the model only: no real rows leave this step
        shutil.rmtree(ws.joinpath(*parts), ignore_errors=True)
    epochs = None
    progress_csv = ws / "ModelStore" / "model-data" / "progress-messages.csv"
    if progress_csv.exists():
        prog = pd.read_csv(progress_csv)
        if "epoch" in prog.columns and len(prog):
            epochs = float(prog["epoch"].max())
    return {"rows": int(len(df)), "columns": int(df.shape[1]), "device": device, "seconds": round(seconds, 3),
            "train_seconds": round(time.perf_counter() - t1, 3), "epochs": epochs}


def sample(a: argparse.Namespace) -> dict:
    import pandas as pd
    from mostlyai import engine

    ws = Path(a.workspace)
    device = _device(a.device)
    engine.set_random_state(a.seed)
    shutil.rmtree(ws / "SyntheticData", ignore_errors=True)
    t0 = time.perf_counter()
    engine.generate(sample_size=a.rows, batch_size=a.batch_size, device=device, workspace_dir=ws,
                    update_progress=_progress("sample"))
    parts = sorted((ws / "SyntheticData").glob("*.parquet"))
    out = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
    out.to_parquet(a.out, index=False)
    shutil.rmtree(ws / "SyntheticData", ignore_errors=True)
    return {"rows": int(len(out)), "device": device, "seconds": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--train", required=True)
    f.add_argument("--workspace", required=True)
    f.add_argument("--epochs", type=float, default=100.0)
    f.add_argument("--max-minutes", type=float, default=14400.0)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--model", default="MOSTLY_AI/Medium")
    f.add_argument("--no-value-protection", dest="value_protection", action="store_false")
    s = sub.add_parser("sample")
    s.add_argument("--workspace", required=True)
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--batch-size", type=int, default=None)
    for q in (f, s):
        q.add_argument("--seed", type=int, default=42)
        q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = fit(a) if a.command == "fit" else sample(a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
