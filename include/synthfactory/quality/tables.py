"""Per-table and cross-table fidelity of relational mode, every figure beside its real-data reference.

The reference is real data scored as the synthetic tables are: the real (train) patients are re-split into a
train part and a held-out part of ``holdout_fraction``, and each table of the held-out patients is scored
against the same table of the train part. The synthetic figures use as many synthetic patients as the
held-out part has (SDMetrics scores grow with the row count, so only equal sizes compare). Per table:

* **quality**: SDMetrics single-table quality (Column Shapes, Column Pair Trends) over the table's columns
  without keys (times as datetimes, at most ``max_rows`` rows a side);
* **children_ks**: KS of the number of rows per patient (patients with none count as 0);
* **value_ks**: per code with ``min_values`` real values, KS of the numeric value (``value_num`` /
  ``dose_value``) of that code; the median and the worst over codes;
* **checks**: GX expectations per table (keys unique and present, referential integrity to the patient and
  the same patient's encounter, date order, codes and (code, system, display, unit) units seen in the real
  table), run with Great Expectations 1.x.

:func:`gate_tables` turns figures and reference into per-table decisions: quality at least
``quality_fraction`` of the reference mean, children-per-patient KS at most the reference's + ``ks_margin``,
every check passed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from synthfactory.quality.expectations import to_jsonable
from synthfactory.quality.reference import summarise

log = logging.getLogger(__name__)

ROOT = "patient"
KEY = "patient_key"
ENC_KEY = "encounter_key"
VALUE_COLUMNS = ("value_num", "dose_value")
TIME_PREFERENCE = ("start", "onset", "effective", "authored_on", "performed_start", "performed", "recorded",
                   "issued", "date")


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """A table as SDMetrics scores it: no key or precision columns, times tz-naive, no all-missing column."""
    keep = [c for c in df.columns if not c.endswith(("_key", "_precision")) and df[c].notna().any()]
    out = df[keep].copy()
    for c in keep:
        s = out[c]
        # one unit (ns) on both sides: SDMetrics compares datetimes as integers, and Parquet gives us or ns
        if pd.api.types.is_datetime64_any_dtype(s):
            out[c] = pd.to_datetime(s, utc=True).dt.tz_convert(None).astype("datetime64[ns]")
        elif s.dtype == object and s.dropna().map(lambda v: hasattr(v, "year")).all():
            out[c] = pd.to_datetime(s, errors="coerce").astype("datetime64[ns]")
    return out


def _metadata(df: pd.DataFrame) -> dict:
    cols = {}
    for c in df.columns:
        s = df[c]
        if pd.api.types.is_bool_dtype(s):
            cols[c] = {"sdtype": "boolean"}
        elif pd.api.types.is_datetime64_any_dtype(s):
            cols[c] = {"sdtype": "datetime"}
        elif pd.api.types.is_numeric_dtype(s):
            cols[c] = {"sdtype": "numerical"}
        else:
            cols[c] = {"sdtype": "categorical"}
    return {"columns": cols}


def _cap(df: pd.DataFrame, max_rows: int, rng: np.random.Generator) -> pd.DataFrame:
    if len(df) <= max_rows:
        return df.reset_index(drop=True)
    return df.iloc[np.sort(rng.choice(len(df), size=max_rows, replace=False))].reset_index(drop=True)


def counts_per_patient(tables: Mapping[str, pd.DataFrame], name: str) -> np.ndarray:
    return tables[name].groupby(KEY).size().reindex(tables[ROOT][KEY], fill_value=0).to_numpy()


def value_ks(real: pd.DataFrame, other: pd.DataFrame, min_values: int = 30) -> dict[str, float]:
    """Per code with ``min_values`` real values: KS of its numeric value (real vs other)."""
    from scipy.stats import ks_2samp

    col = next((c for c in VALUE_COLUMNS if c in real.columns), None)
    if col is None or "code" not in real.columns:
        return {}
    out = {}
    r = real.dropna(subset=["code", col])
    o = other.dropna(subset=["code", col]) if col in other else other.iloc[0:0]
    og = dict(tuple(o.groupby("code")[col])) if len(o) else {}
    for code, rv in r.groupby("code")[col]:
        if len(rv) < min_values:
            continue
        ov = og.get(code)
        out[str(code)] = 1.0 if ov is None or len(ov) == 0 else float(ks_2samp(rv.to_numpy(), ov.to_numpy()).statistic)
    return out


def score_tables(real: Mapping[str, pd.DataFrame], other: Mapping[str, pd.DataFrame], *, max_rows: int = 5000,
                 min_values: int = 30, seed: int = 0) -> dict[str, dict]:
    """Every per-table figure of ``other`` (held-out real patients, or synthetic ones) against ``real``."""
    from scipy.stats import ks_2samp

    from synthfactory.quality.report import sdmetrics_quality

    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    for name, rdf in real.items():
        if name not in other:
            continue
        r, o = comparable(_cap(rdf, max_rows, rng)), comparable(_cap(other[name], max_rows, rng))
        o = o[[c for c in r.columns if c in o.columns]]
        sdm = sdmetrics_quality(r, o, _metadata(r)) if len(o) and len(r) else {"score": None, "properties": {}}
        fig: dict[str, Any] = {"quality": sdm.get("score"),
                               "column_shapes": (sdm.get("properties") or {}).get("Column Shapes"),
                               "column_pair_trends": (sdm.get("properties") or {}).get("Column Pair Trends")}
        if name != ROOT and KEY in rdf.columns:
            fig["children_ks"] = float(ks_2samp(counts_per_patient(real, name),
                                                counts_per_patient(other, name)).statistic)
            vk = value_ks(rdf, other[name], min_values)
            if vk:
                fig["value_ks_median"] = float(np.median(list(vk.values())))
                fig["value_ks_worst"] = float(max(vk.values()))
                fig["value_ks_codes"] = len(vk)
        out[name] = fig
    return out


def _split(tables: Mapping[str, pd.DataFrame], keys: set) -> dict[str, pd.DataFrame]:
    return {n: df[df[KEY].isin(keys)].reset_index(drop=True) for n, df in tables.items() if KEY in df.columns}


def relational_reference(tables: Mapping[str, pd.DataFrame], *, holdout_fraction: float = 0.2, resplits: int = 3,
                         max_rows: int = 5000, min_values: int = 30, seed: int = 0) -> dict:
    """Per table, each figure of real held-out patients vs real train patients over ``resplits`` re-splits:
    ``{table: {figure: summary}}`` plus ``holdout_patients`` (the size the synthetic figures use)."""
    keys = tables[ROOT][KEY].to_numpy()
    n_hold = max(1, int(round(len(keys) * holdout_fraction)))
    rng = np.random.default_rng(seed)
    runs: dict[str, dict[str, list]] = {}
    for i in range(max(1, int(resplits))):
        perm = rng.permutation(len(keys))
        hold, train = set(keys[perm[:n_hold]]), set(keys[perm[n_hold:]])
        for name, fig in score_tables(_split(tables, train), _split(tables, hold), max_rows=max_rows,
                                      min_values=min_values, seed=seed + i).items():
            for k, v in fig.items():
                runs.setdefault(name, {}).setdefault(k, []).append(v)
    out: dict[str, Any] = {name: {k: summarise(v) for k, v in figs.items()} for name, figs in runs.items()}
    return to_jsonable({"tables": out, "holdout_patients": n_hold, "resplits": max(1, int(resplits))})


def synthetic_figures(real: Mapping[str, pd.DataFrame], synthetic: Mapping[str, pd.DataFrame], *, patients: int,
                      repeats: int = 2, max_rows: int = 5000, min_values: int = 30, seed: int = 0) -> dict:
    """Per table, each figure of ``patients`` synthetic patients (``repeats`` seeded subsets, their whole
    records) against the real tables: ``{table: {figure: summary}}``."""
    keys = synthetic[ROOT][KEY].to_numpy()
    n = min(int(patients), len(keys))
    rng = np.random.default_rng(seed + 7919)
    runs: dict[str, dict[str, list]] = {}
    for i in range(max(1, int(repeats))):
        pick = set(keys[rng.choice(len(keys), size=n, replace=False)])
        for name, fig in score_tables(real, _split(synthetic, pick), max_rows=max_rows, min_values=min_values,
                                      seed=seed + i).items():
            for k, v in fig.items():
                runs.setdefault(name, {}).setdefault(k, []).append(v)
    return to_jsonable({"tables": {name: {k: summarise(v) for k, v in figs.items()} for name, figs in runs.items()},
                        "patients": n})


# -- GX checks per table -----------------------------------------------------------------------------
def table_suites(real: Mapping[str, pd.DataFrame], synthetic: Mapping[str, pd.DataFrame]) -> dict[str, dict]:
    """One GX suite per synthetic table: keys, referential integrity, date order, code validity."""
    from synthfactory.quality import expectations as ex

    suites: dict[str, dict] = {}
    pkeys = synthetic[ROOT][KEY]
    for name, df in synthetic.items():
        exps: list[dict] = []
        own = KEY if name == ROOT else f"{name}_key"
        if own in df:
            exps += ex.key_expectations(own)
        if name != ROOT and KEY in df:
            exps.append(ex.referential_integrity_expectation(KEY, pkeys))
        if name != ROOT and ENC_KEY in df and "encounter" in synthetic and name != "encounter":
            exps.append(ex.referential_integrity_expectation(ENC_KEY, synthetic["encounter"][ENC_KEY]))
        for a, b in (("start", "end"), ("performed_start", "performed_end"), ("birth_date", "deceased_date"),
                     ("effective", "issued")):
            if a in df and b in df:
                exps.append(ex.date_order_expectation(a, b))
        if name in real:
            for code in [c for c in df.columns if (c == "code" or c.endswith("_code")) and c in real[name]]:
                exps.append(ex._config(_in_set(code, real[name][code])))
        suites[name] = {"name": f"relational_{name}", "expectations": exps}
    return suites


def _in_set(column: str, values: pd.Series) -> Any:
    import great_expectations as gx

    vs = sorted({str(v) for v in values.dropna()})
    return gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=vs)


def cross_table_checks(synthetic: Mapping[str, pd.DataFrame], real: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """What one table's GX suite cannot see: a linked encounter of the same patient, events not before the
    patient's birth, and (code, system, display, unit) units never seen in the real table (0 expected)."""
    out: dict[str, int] = {}
    p = synthetic[ROOT]
    birth = pd.Series(pd.to_datetime(p["birth_date"]).to_numpy(), index=p[KEY]) if "birth_date" in p else None
    enc = synthetic.get("encounter")
    owner = dict(zip(enc[ENC_KEY], enc[KEY])) if enc is not None and len(enc) else {}
    for name, df in synthetic.items():
        if name == ROOT:
            continue
        if ENC_KEY in df and name != "encounter":
            linked = df[ENC_KEY].notna()
            out[f"{name}.encounter_of_another_patient"] = int((df.loc[linked, ENC_KEY].map(owner)
                                                               != df.loc[linked, KEY]).sum())
        t = next((c for c in TIME_PREFERENCE if c in df), None)
        if t and birth is not None and len(df):
            tt = pd.to_datetime(df[t], utc=True).dt.tz_convert(None)
            b = df[KEY].map(birth)
            out[f"{name}.{t}_before_birth"] = int((tt.notna() & b.notna() & (tt < b)).sum())
    from synthfactory.synthesize.relational import unseen_concepts

    for k, v in unseen_concepts(dict(real), dict(synthetic)).items():
        out[f"{k}.unseen_concepts"] = int(v["unseen"])
    return out


def run_table_checks(real: Mapping[str, pd.DataFrame], synthetic: Mapping[str, pd.DataFrame]) -> dict[str, dict]:
    """Per table: the GX suite's result (``success``, ``success_ratio``, failures) and the cross-table checks."""
    from synthfactory.quality.expectations import run_suite

    out: dict[str, dict] = {}
    for name, suite in table_suites(real, synthetic).items():
        res = run_suite(suite, synthetic[name])
        out[name] = {"success": bool(res.get("success")), "success_ratio": res.get("success_ratio"),
                     "evaluated": res.get("evaluated"),
                     "failed": [{"expectation": f.get("expectation"), "column": f.get("column")}
                                for f in res.get("failed") or []]}
    cross = cross_table_checks(synthetic, real)
    for k, v in cross.items():
        table = k.split(".", 1)[0]
        out.setdefault(table, {"success": True, "failed": []})
        out[table].setdefault("cross_table", {})[k] = v
        if v:
            out[table]["success"] = False
    return to_jsonable(out)


# -- gate -----------------------------------------------------------------------------------------------
def gate_tables(figures: Mapping[str, Any], reference: Mapping[str, Any], checks: Mapping[str, Any] | None = None,
                *, quality_fraction: float = 0.95, ks_margin: float = 0.05, noise_z: float = 0.0) -> dict:
    """Per table: quality >= ``quality_fraction`` x the reference mean (minus ``noise_z`` reference standard
    deviations), children-per-patient KS <= the reference mean + ``ks_margin`` (plus ``noise_z`` sd), the
    table's checks passed. ``passed`` is the record's decision (all tables)."""
    tables: dict[str, dict] = {}
    ref_t = (reference or {}).get("tables") or {}
    for name, fig in ((figures or {}).get("tables") or {}).items():
        ref = ref_t.get(name) or {}
        rows = []
        q, rq = (fig.get("quality") or {}).get("mean"), (ref.get("quality") or {}).get("mean")
        if rq is not None:
            thr = quality_fraction * rq - noise_z * float((ref.get("quality") or {}).get("sd") or 0.0)
            rows.append({"figure": "quality", "value": q, "op": ">=", "threshold": round(thr, 4),
                         "reference": rq, "passed": q is not None and q >= thr})
        k, rk = (fig.get("children_ks") or {}).get("mean"), (ref.get("children_ks") or {}).get("mean")
        if rk is not None:
            thr = rk + ks_margin + noise_z * float((ref.get("children_ks") or {}).get("sd") or 0.0)
            rows.append({"figure": "children_ks", "value": k, "op": "<=", "threshold": round(thr, 4),
                         "reference": rk, "passed": k is not None and k <= thr})
        if checks and name in checks:
            rows.append({"figure": "checks", "value": bool(checks[name].get("success")), "op": "==",
                         "threshold": True, "reference": None, "passed": bool(checks[name].get("success"))})
        tables[name] = {"checks": rows, "passed": all(r["passed"] for r in rows)}
    return to_jsonable({"tables": tables, "passed": bool(tables) and all(t["passed"] for t in tables.values()),
                        "quality_fraction": quality_fraction, "ks_margin": ks_margin, "noise_z": noise_z})
