"""Relational synthesis of the whole patient record: patients with their encounters, conditions,
observations (and medication requests, procedures, ... whenever ingest provides a table with a
``patient_key``), keys and referential integrity kept.

Layout (``engine: patient_centred``, the default)
-------------------------------------------------
SDV's HMA refuses schemas of more than 5 tables or deeper than 2 (patient → encounter → observation is
already 3), fits one copula per parent row, and measured 37 s fit / 125 s sample for 300 patients on this
machine. So the record is modelled patient-centred, as a star with the patient at the centre:

* **root**: one row per patient — demographics, ``birth_date``, ``deceased``/``deceased_date``
  (SDV ``Inequality(birth_date, deceased_date)``), the number of rows of every child table
  (``n_<table>``: children-per-parent is a column of the patient model, so its distribution and its
  correlation with age or sex are learnt) and flags for the most frequent condition codes. Any
  single-table kind fits it (GaussianCopula, CTGAN, ...; rebalancing/oversampling happen here, so whole
  records follow).
* **children**: one single-table model per child table over its rows plus the parent's *context*
  (sex, age band, condition flags). A synthetic patient's ``n_<table>`` rows are drawn from the child model
  *given its context*: a pool is sampled in bulk and matched on the context (rows of the joint model
  restricted to a context are draws from the conditional), short contexts are topped up with SDV
  ``Condition`` sampling, then relaxed (counted). Condition rows honour the root's flags exactly: one row
  per flagged code, the rest from the other codes.
* **links and time**: keys are fresh (``syn-…``) and assigned by construction (100 % referential integrity).
  Event timing (the section "event timing inside encounters"): a patient's encounters get their times as a
  sequence (the days between them from the real gaps of patients with as many encounters, each stay as long
  as real ones of its class, after the birth and before the death and the reference date); the encounter
  model draws rows given the size of the rest of the record. A child row draws the class of its encounter
  with its other columns (given which kinds of encounter the patient has) and is linked to one of the
  patient's encounters of that class (shared out over them for a table every visit has, else the nearest in
  time), then placed inside it as real rows sit (the first time at the start as often as real ones', panels
  sharing a time, positions per class). Other models (no encounter class): linked to the nearest encounter
  at the real linking rate, then placed the same way. ``birth <= event`` and ``event <= death`` cross
  tables and are post-fixed (clipped), each fix counted in the report.

``engine: hma`` runs SDV's HMASynthesizer on the same star (patient + at most 4 child tables; encounter
links restored the same way). ``engine: par`` keeps the root model and draws each patient's child rows as a
sequence with SDV's PARSynthesizer (context = the same context columns, length = the root's count).
Both are measured in ``bench/synth_bench.py``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
from synthfactory.errors import ConfigError

log = logging.getLogger(__name__)

ROOT = "patient"
KEY = "patient_key"
ENCOUNTER = "encounter"
ENC_KEY = "encounter_key"
TIME_PREFERENCE = ("start", "onset", "effective", "authored_on", "performed", "recorded", "issued", "date")
ABBREV = {"patient": "p", "encounter": "e", "condition": "c", "observation": "o", "medication_request": "m",
          "procedure": "x"}
OTHER = "__other__"
ENGINES = ("patient_centred", "hma", "par")
#: free-text fields (by column name): never a model input, never copied to the output (left empty)
FREE_TEXT = re.compile(r"(^|_)(note|notes|text|narrative|comment|comments|description|name|names|address|"
                       r"value_string|string|instruction|instructions)($|_)")
#: what a coded value looks like (a numeric or upper-case code, a boolean); anything else in ``value_code``
#: may be a ``valueString`` (free text: "No growth", "nasal_cannula", an address) and is not modelled
CODE_LIKE = re.compile(r"^(true|false|[0-9][0-9.\-]{0,31}|[A-Z][A-Za-z0-9.\-]{0,31})$")
#: a concept without a code (only CodeableConcept.text) is kept only when at least this many patients share it
TEXT_CONCEPT_MIN_PATIENTS = 5
TEXT_TOKEN = "text:"
#: modelled per child row: does it reference an encounter (learnt with the code and time, so an acute condition
#: of the encounter year is linked and a chronic one with an onset years before is not)
LINKED = "__linked"
#: per child table with a code (not condition, which has flags), the root carries each patient's number of rows of
#: the codes whose presence varies most between patients (``n_<table>__<code>``, by p(1-p) of the share of
#: patients with the code, at least COUNT_CODES_MIN_SHARE and 10 patients): which labs a patient has (HbA1c in
#: 12 % of the patients, 9 each, not one here and there) is then a patient-level decision, learnt with the
#: patient's other counts
COUNT_CODES_TOP = 16
COUNT_CODES_MIN_SHARE = 0.02
COUNT_CODES_UNIVERSAL = 0.9
#: below this many patients the per-code counts model has too few rows per leaf (30): the total, a sum of ~25
#: drawn counts, lost its shape (observations per patient KS 0.21 at 85 patients); labs are then drawn row by row
COUNT_CODES_MIN_PATIENTS = 300
#: the tables that get per-code counts: observations (the labs the patient-level features come from). Measured
#: on clino_41 for medication requests too: the per-patient total, a sum of 17 drawn counts, lost its lumps
#: (requests come in pairs), children-per-patient KS 0.028 -> 0.091 (reference 0.035)
COUNT_CODE_TABLES = ("observation",)
#: the encounter classes counted per patient (``n_encounter__<class>``, with the labs' per-code counts): the
#: classes at least COUNT_CODES_MIN_SHARE and 10 patients have, fewer than COUNT_CODES_UNIVERSAL of them (the
#: usual outpatient class takes the rest of the patient's encounters). Drawn row by row, an inpatient stay was
#: one row of many in a leaf: on clinosim cohort 23, synthetic patients with >= 255 observations had one in
#: 35-53 % (real 98 %), the others in 5-8 % (real 1-3 %), and their observations went to outpatient visits
COUNT_ENCOUNTER_CLASSES = True


class RelationalError(ConfigError, ValueError):
    """The tables or the relational settings cannot be synthesized (message names the table/setting)."""


def flag_column(code: str) -> str:
    return "flag_" + re.sub(r"[^a-z0-9]+", "_", str(code).lower()).strip("_")


def count_column(table: str) -> str:
    return f"n_{table}"


def code_count_column(table: str, code: str) -> str:
    return f"n_{table}__" + re.sub(r"[^a-z0-9]+", "_", str(code).lower()).strip("_")


def code_count_frame(tables: dict[str, pd.DataFrame], layout: "Layout", root: pd.DataFrame,
                     ctx: pd.DataFrame) -> pd.DataFrame:
    """The per-code counts model's table: each patient's context and children counts (the predictors), then its
    number of rows of every counted code."""
    out = code_count_given(root, ctx, layout)
    for name, cl in layout.children.items():
        if not cl.count_codes:
            continue
        by = getattr(cl, "counted_by", "code")
        tok = concept_tokens(tables[name], by, cl.concepts[by]["columns"]) if by in cl.concepts \
            else tables[name][by]
        tok = pd.Series(np.asarray(tok, dtype=object), index=tables[name].index)
        keys = root[KEY].astype(str).to_numpy()
        coded = np.zeros(len(out), dtype="int64")
        for col, code in cl.count_codes.items():
            per = tables[name].loc[tok == code].groupby(KEY).size()
            out[col] = pd.Series(keys).map(per).fillna(0).astype("int64").to_numpy()
            coded += out[col].to_numpy()
        out[other_count_column(name)] = out[count_column(name)].to_numpy() - coded
    return out


def other_count_column(table: str) -> str:
    """The per-code counts model's count of the patient's rows of the other codes: the patient's total is the sum
    (the patient model's total is only a predictor), so the rows left over never pile onto the rare codes."""
    return f"n_{table}__other_codes"


def code_count_given(root: pd.DataFrame, ctx: pd.DataFrame, layout: "Layout") -> pd.DataFrame:
    """The predictors of the per-code counts: the patient's context and its number of rows of every child table."""
    given = ctx[[c for c in layout.context if c in ctx]].reset_index(drop=True).copy()
    for name in layout.children:
        given[count_column(name)] = root[count_column(name)].clip(lower=0).astype("int64").to_numpy()
    return given


# -- layout ---------------------------------------------------------------------------------------
@dataclass
class ChildLayout:
    name: str
    key: str                                   # own key column (``<name>_key``)
    time: str | None                           # main event time column
    later_times: list[str]                     # other time columns that are never before ``time`` (Inequality)
    columns: list[str]                         # modelled child columns (without context)
    derived: dict[str, tuple[str, dict]]       # column -> (source column, value map): e.g. display from code
    constants: dict[str, Any]                  # column -> the one value it has
    all_columns: list[str]                     # output column order (the flattened table's)
    link_rate: float = 0.0                     # share of real rows that reference an encounter
    snap_rate: float = 0.0                     # share of linked real rows whose time is the encounter start
    code_column: str | None = None             # the coded table whose top codes become root flags
    code_stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # col -> code -> mean, sd, lo, hi
    decimals: dict[str, int] = field(default_factory=dict)
    # code column -> {"columns": companions (system, display, unit), "map": token -> {column: value}}: a coded
    # concept is one unit, its display/system/unit the most frequent real ones of its code (never recombined)
    concepts: dict[str, dict] = field(default_factory=dict)
    free_text: list[str] = field(default_factory=list)       # columns left empty (never modelled)
    value_codes: dict[str, list[str]] = field(default_factory=dict)  # code -> its real coded values
    # where linked rows sit inside their encounter (aggregates, see :func:`encounter_timing`); empty: snapping only
    timing: dict[str, Any] = field(default_factory=dict)
    count_codes: dict[str, str] = field(default_factory=dict)  # root column n_<table>__<code> -> code token
    counted_by: str = "code"                   # the column whose values count_codes counts (encounter: class_code)
    # the patient's total of this table stays the patient model's (the counted codes are a minority, the rest
    # takes what they leave), instead of the sum of the counted codes and the others
    total_from_root: bool = False
    # col -> "<code>|<count bucket>" -> mean, sd: a counted code's values standardised within the patients with as
    # many rows of it (:func:`stratum_stats`); the code's own stats where a stratum is too small
    strata_stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class Layout:
    root_columns: list[str]
    root_all_columns: list[str]
    root_constants: dict[str, Any]
    children: dict[str, ChildLayout]
    flags: list[str]                           # condition codes with a root flag
    context: list[str]                         # root-derived context columns shared by all child models
    reference: pd.Timestamp
    age_band_years: int = 20

    @property
    def order(self) -> list[str]:
        names = list(self.children)
        return sorted(names, key=lambda n: (n != ENCOUNTER, names.index(n)))


def _is_time(s: pd.Series) -> bool:
    return pd.api.types.is_datetime64_any_dtype(s)


def _naive_utc(s: pd.Series) -> pd.Series:
    s = pd.to_datetime(s, errors="coerce", utc=True)
    return s.dt.tz_convert(None).astype("datetime64[ns]")


def _dependency_map(df: pd.DataFrame, col: str, candidates: list[str]) -> tuple[str, dict] | None:
    """(source, map) when ``col`` is a function of one of ``candidates`` (e.g. display of code)."""
    sub = df[df[col].notna()]
    for src in candidates:
        if src == col or sub.empty:
            continue
        g = sub.groupby(src, dropna=False)[col].nunique()
        if len(g) and g.max() <= 1 and df.loc[df[src].notna() & df[col].isna()].empty:
            mapping = sub.drop_duplicates(src).set_index(src)[col].to_dict()
            return src, mapping
    return None


def is_free_text_column(name: str) -> bool:
    return bool(FREE_TEXT.search(name.lower())) and not name.endswith(("_key", "_code", "_display", "_system"))


def concept_groups(columns: list[str]) -> dict[str, list[str]]:
    """Code column -> its companion columns (system, display, and for ``code`` the unit): one concept unit."""
    out = {}
    for c in columns:
        if c != "code" and not c.endswith("_code") or c == "value_code":
            continue
        prefix = c[:-4]
        comp = [x for x in (f"{prefix}code_system", f"{prefix}system", f"{prefix}display") if x in columns]
        if c == "code":
            comp += [x for x in ("unit", "dose_unit") if x in columns]
        if comp:
            out[c] = comp
    return out


def concept_tokens(df: pd.DataFrame, code: str, companions: list[str]) -> pd.Series:
    """The modelled concept of each row: its code, or ``text:<display>`` for a code-less concept that at least
    :data:`TEXT_CONCEPT_MIN_PATIENTS` patients share (rarer code-less texts may be free text: None)."""
    tok = df[code].astype(object).where(df[code].notna(), None)
    disp = next((c for c in companions if c.endswith("display")), None)
    if disp is not None:
        textual = df[code].isna() & df[disp].notna()
        if textual.any():
            shared = df.loc[textual].groupby(disp)[KEY].nunique()
            keep = set(shared[shared >= TEXT_CONCEPT_MIN_PATIENTS].index)
            t = df.loc[textual, disp]
            tok.loc[textual] = t.map(lambda v: TEXT_TOKEN + str(v) if v in keep else None)
    return tok


def concept_map(df: pd.DataFrame, code: str, companions: list[str]) -> dict[str, dict]:
    """token -> the most frequent real (code, system, display, unit) of that token."""
    cols = [code, *companions]
    sub = df[cols].copy()
    sub["__tok"] = concept_tokens(df, code, companions).values
    sub = sub[sub["__tok"].notna()]
    if sub.empty:
        return {}
    counts: dict[str, dict[tuple, int]] = {}
    values = sub[cols].astype(object).where(sub[cols].notna(), None).values.tolist()
    for tok, row in zip(sub["__tok"].astype(str), values):
        c = counts.setdefault(tok, {})
        c[tuple(row)] = c.get(tuple(row), 0) + 1
    out = {}
    for tok, c in counts.items():
        best = max(c.items(), key=lambda kv: kv[1])[0]  # the most frequent; ties: the first seen
        out[tok] = dict(zip(cols, best))
    return out


def clean_value_codes(s: pd.Series) -> pd.Series:
    """``value_code`` with anything that does not look like a code (a valueString's free text) removed."""
    ok = s.astype(object).map(lambda v: isinstance(v, str) and bool(CODE_LIKE.match(v)))
    return s.astype(object).where(ok & s.notna(), None)


def _prepared(df: pd.DataFrame, concepts: dict[str, dict], free: list[str]) -> pd.DataFrame:
    """The real child rows as the models see them: concept tokens in the code columns, free text removed."""
    df = df.copy()
    if ENC_KEY in df.columns:
        df[LINKED] = df[ENC_KEY].notna()
    for code, c in concepts.items():
        df[code] = concept_tokens(df, code, c["columns"]).values
    if "value_code" in df:
        df["value_code"] = clean_value_codes(df["value_code"])
    for c in free:
        df[c] = None
    return df


def _decimals(s: pd.Series) -> int:
    v = s.dropna().to_numpy(dtype=float)
    for k in range(7):
        if np.allclose(v * 10**k, np.round(v * 10**k)):
            return k
    return 6


#: a (code, count bucket) stratum gets its own value map with at least this many real values from at least
#: :data:`STRATUM_MIN_PATIENTS` patients (an aggregate of many patients, never one patient's values)
STRATUM_MIN_VALUES = 50
STRATUM_MIN_PATIENTS = 20
#: quantiles kept per stratum (probabilities evenly spaced from 0 to 1)
STRATUM_QUANTILES = 41


def stratum_stats(df: pd.DataFrame, codes: set[str], columns: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per value column: the quantiles (:data:`STRATUM_QUANTILES`) of each counted code's values among the
    patients with as many rows of that code (:func:`code_n_bucket`), keyed ``"<code>|<bucket>"``. The value
    model draws standardised values from leaves that hold many codes and counts (``min_leaf`` rows: about 630
    in a 100k-row observation table), so a stratum smaller than a leaf (the ~340 glucose values of patients
    measured once) took the location and shape of the code as a whole. Its values are mapped to normal scores
    through its own quantiles and back (:func:`standardise`), so a pooled leaf still gives each stratum its
    own distribution. Measured on clinosim seed 67: patients measured once, real glucose median 98 (IQR
    94-103), drawn at 105.5 (IQR 92-137) before; the patients' last glucose quartiles 93/110/143 vs 95/99/107."""
    if not codes or "code" not in df or not columns:
        return {}
    d = df[df["code"].notna()]
    d = d[d["code"].astype(str).isin(codes)]
    if d.empty:
        return {}
    code = d["code"].astype(str)
    bucket = code_n_bucket(code.groupby([d[KEY].astype(str), code]).transform("size").to_numpy()).astype(int)
    key = code + "|" + pd.Series(bucket, index=d.index).astype(str)
    probs = np.linspace(0.0, 1.0, STRATUM_QUANTILES)
    out: dict[str, dict[str, list[float]]] = {}
    for c in columns:
        if c not in d:
            continue
        v = pd.to_numeric(d[c], errors="coerce")
        ok = v.notna()
        frame = pd.DataFrame({"k": key[ok], "v": v[ok], "p": d.loc[ok, KEY].astype(str)})
        kept: dict[str, list[float]] = {}
        for k, g in frame.groupby("k"):
            if len(g) >= STRATUM_MIN_VALUES and g["p"].nunique() >= STRATUM_MIN_PATIENTS and g["v"].nunique() > 1:
                kept[str(k)] = [float(x) for x in np.quantile(g["v"].to_numpy(dtype=float), probs)]
        if kept:
            out[c] = kept
    return out


def _strata_keys(cl: "ChildLayout", col: str, df: pd.DataFrame) -> pd.Series | None:
    ss = cl.strata_stats.get(col) if getattr(cl, "strata_stats", None) else None
    if not ss or CODE_N not in df.columns or "code" not in df.columns:
        return None
    n = pd.to_numeric(df[CODE_N], errors="coerce").round()
    key = df["code"].astype(str) + "|" + n.astype("Int64").astype(str)
    return key.where(key.isin(list(ss)))


def _quantile_grid(q: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Strictly increasing values (ties spread by a negligible step) and their probabilities."""
    x = np.asarray(q, dtype=float)
    x = x + np.arange(x.size) * (max(abs(x[-1] - x[0]), 1.0) * 1e-9)
    return x, np.linspace(0.0, 1.0, x.size)


def from_quantiles(q: Any, u: np.ndarray) -> np.ndarray:
    """Values at probabilities ``u`` (in [0, 1]) of a distribution kept as evenly spaced quantiles ``q`` (the
    aggregates the model keeps of real times, gaps and durations): linear between quantiles; one quantile, or
    none (0), is a constant."""
    q = np.asarray(q if q is not None and len(q) else [0.0], dtype=float)
    return np.interp(u, np.linspace(0, 1, q.size), q) if q.size > 1 else np.full(np.shape(u), q[0])


#: normal scores are kept inside +-this many sd (probabilities 1e-4 .. 1 - 1e-4 at the ends of a stratum)
STRATUM_Z = 3.719


def _code_mean_sd(cl: "ChildLayout", col: str, df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    st = cl.code_stats[col]
    code = df["code"].astype(str)
    return code.map({k: v[0] for k, v in st.items()}), code.map({k: v[1] for k, v in st.items()})


def _per_stratum(cl: "ChildLayout", col: str, df: pd.DataFrame, out: pd.Series, values: np.ndarray,
                 fn: Any) -> pd.Series:
    """``out`` with the rows of each (code, count bucket) stratum replaced by ``fn(values, quantiles, probs)``."""
    keys = _strata_keys(cl, col, df)
    if keys is None:
        return out
    arr, k_arr = out.to_numpy(dtype=object).copy(), keys.to_numpy(dtype=object)
    for k in pd.unique(keys.dropna()):
        rows = k_arr == k
        x, p = _quantile_grid(cl.strata_stats[col][k])
        v = values[rows]
        arr[rows] = np.where(np.isnan(v), np.nan, fn(v, x, p))
    return pd.Series(arr, index=df.index, name=col).astype(float)


def standardise(cl: "ChildLayout", col: str, df: pd.DataFrame) -> pd.Series:
    """``df[col]`` standardised row by row: a row of a (code, count bucket) stratum with quantiles
    (:func:`stratum_stats`; the row carries :data:`CODE_N`) to its normal score within the stratum, any other
    row with a code stat to (value - code mean) / code sd; rows without either unchanged."""
    from scipy.stats import norm

    mean, sd = _code_mean_sd(cl, col, df)
    vals = pd.to_numeric(df[col], errors="coerce")
    out = ((vals - mean) / sd).where(mean.notna(), df[col])
    lo, hi = norm.cdf(-STRATUM_Z), norm.cdf(STRATUM_Z)
    return _per_stratum(cl, col, df, out, vals.to_numpy(dtype=float),
                        lambda v, x, p: norm.ppf(np.clip(np.interp(v, x, p), lo, hi)))


def destandardise(cl: "ChildLayout", col: str, df: pd.DataFrame) -> pd.Series:
    """The inverse of :func:`standardise` (no clipping here)."""
    from scipy.stats import norm

    mean, sd = _code_mean_sd(cl, col, df)
    z = pd.to_numeric(df[col], errors="coerce")
    out = (z * sd + mean).where(mean.notna(), df[col])
    return _per_stratum(cl, col, df, out, z.to_numpy(dtype=float), lambda v, x, p: np.interp(norm.cdf(v), p, x))


def derive_layout(tables: dict[str, pd.DataFrame], *, flags_top: int = 3, age_band_years: int = 20,
                  reference: str | None = None, exclude: tuple[str, ...] = (),
                  extra_flags: tuple[str, ...] = (), extra_count_codes: tuple[str, ...] = ()) -> Layout:
    if ROOT not in tables or tables[ROOT].empty:
        raise RelationalError("relational synthesis needs the patient table")
    patient = tables[ROOT]
    consts = {c: patient[c].dropna().iloc[0] if patient[c].notna().any() else None
              for c in patient.columns if c != KEY and patient[c].nunique(dropna=False) <= 1}
    root_cols = [c for c in patient.columns if c != KEY and c not in consts and not is_free_text_column(c)]
    times = []
    for name, df in tables.items():
        for c in df.columns:
            if name != ROOT and _is_time(df[c]) and df[c].notna().any():
                times.append(df[c].max())
    ref = pd.Timestamp(reference, tz="UTC") if reference else (max(times) if times else pd.Timestamp.now(tz="UTC"))
    children: dict[str, ChildLayout] = {}
    for name, df in tables.items():
        if name == ROOT or name in exclude or KEY not in df.columns or df.empty:
            continue
        own_key = f"{name}_key"
        if own_key not in df.columns:
            log.warning("table %s has no %s column; left out of relational synthesis", name, own_key)
            continue
        tcols = [c for c in df.columns if _is_time(df[c]) and df[c].notna().any()]
        main = next((c for c in TIME_PREFERENCE if c in tcols), tcols[0] if tcols else None)
        later = [c for c in tcols if c != main and main is not None
                 and bool((df[c].isna() | df[main].isna() | (df[c] >= df[main])).all())]
        raw = df
        groups = concept_groups(list(df.columns))
        concepts = {code: {"columns": comp, "map": concept_map(df, code, comp)} for code, comp in groups.items()}
        companions = {c for comp in groups.values() for c in comp}
        free = [c for c in df.columns if is_free_text_column(c) and c not in companions and c not in groups]
        df = _prepared(df, concepts, free)
        skip = {own_key, KEY, ENC_KEY, LINKED} | companions | set(free)
        constants = {c: (df[c].dropna().iloc[0] if df[c].notna().any() else None)
                     for c in df.columns if c not in skip and df[c].nunique(dropna=False) <= 1}
        modelled = [c for c in df.columns if c not in skip and c not in constants
                    and (c in tcols or not _is_time(df[c]))]
        derived: dict[str, tuple[str, dict]] = {}
        cats = [c for c in modelled if c not in tcols and not pd.api.types.is_numeric_dtype(df[c])]
        for col in sorted(cats, key=lambda c: (not c.endswith("display"), c)):
            if not col.endswith("display") and col not in ("unit", "code_system"):
                continue
            dep = _dependency_map(df, col, [c for c in cats if c not in derived and c != col])
            if dep:
                derived[col] = dep
        modelled = [c for c in modelled if c not in derived]
        if ENC_KEY in df.columns and name != ENCOUNTER and 0 < df[LINKED].mean() < 1:
            modelled.append(LINKED)
        value_codes: dict[str, list[str]] = {}
        if "code" in df and "value_code" in modelled:
            vc = df.dropna(subset=["code", "value_code"])
            value_codes = {str(k): sorted(map(str, g.unique())) for k, g in vc.groupby("code")["value_code"]}
        code_stats: dict[str, dict[str, list[float]]] = {}
        decimals: dict[str, int] = {}
        if "code" in modelled:
            for c in modelled:
                if c in tcols or pd.api.types.is_bool_dtype(df[c]) or not pd.api.types.is_numeric_dtype(df[c]):
                    continue
                g = df.dropna(subset=[c]).groupby("code")[c]
                st = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=0), "lo": g.min(), "hi": g.max()})
                st["sd"] = st["sd"].where(st["sd"] > 0, 1.0).fillna(1.0)
                code_stats[c] = {str(k): [float(v) for v in row] for k, row in st.iterrows()}
                decimals[c] = _decimals(df[c])
        count_codes: dict[str, str] = {}
        if name in COUNT_CODE_TABLES and "code" in modelled and COUNT_CODES_TOP and \
                len(patient) >= COUNT_CODES_MIN_PATIENTS:
            n_pat = max(len(patient), 1)
            cover = df.dropna(subset=["code"]).groupby("code")[KEY].nunique()
            cover = cover[cover >= max(COUNT_CODES_MIN_SHARE * n_pat, 10)]
            share = cover / n_pat
            spread = (share * (1 - share)).sort_values(ascending=False, kind="stable")
            # + the near-universal codes (vital signs): drawn row by row, 7-9 % of the patients had no BMI (real 2.5 %)
            chosen = list(spread.index[:COUNT_CODES_TOP]) + [c for c in share.sort_values(ascending=False).index
                                                             if share[c] >= COUNT_CODES_UNIVERSAL]
            # + the spec's labs (features.labs) that enough patients have: how many HbA1c values a patient has is
            # decided with the patient (given the condition flags), not left to the row model's code draw
            # (clinosim seed 23, HbA1c outside the top codes: 62-74 % of the synthetic diabetics had one, real 100 %)
            chosen += [c for c in map(str, extra_count_codes) if c in set(map(str, cover.index))]
            chosen = list(dict.fromkeys(chosen))
            count_codes = {code_count_column(name, c): str(c) for c in chosen}
        counted_by, total_from_root = "code", False
        if name == ENCOUNTER and COUNT_ENCOUNTER_CLASSES and "class_code" in modelled and \
                len(patient) >= COUNT_CODES_MIN_PATIENTS:
            n_pat = max(len(patient), 1)
            share = df.dropna(subset=["class_code"]).groupby("class_code")[KEY].nunique() / n_pat
            share = share[(share * n_pat >= max(COUNT_CODES_MIN_SHARE * n_pat, 10)) & (share < COUNT_CODES_UNIVERSAL)]
            count_codes = {code_count_column(name, c): str(c) for c in share.sort_values(ascending=False).index}
            counted_by, total_from_root = "class_code", True
        strata_stats = stratum_stats(df, set(count_codes.values()), list(code_stats)) if count_codes else {}
        link_rate = snap_rate = 0.0
        if ENC_KEY in df.columns and name != ENCOUNTER:
            link_rate = float(df[ENC_KEY].notna().mean())
            enc = tables.get(ENCOUNTER)
            if link_rate and main and enc is not None and "start" in enc:
                m = df[[ENC_KEY, main]].dropna().merge(enc[[ENC_KEY, "start"]], on=ENC_KEY, how="inner")
                snap_rate = float((m[main] == m["start"]).mean()) if len(m) else 0.0
        timing = encounter_timing(df, tables.get(ENCOUNTER), main) if link_rate and main else {}
        if name == ENCOUNTER and main:
            timing = {"gaps": encounter_gaps(df, main)}
        children[name] = ChildLayout(name=name, key=own_key, time=main, later_times=later, columns=modelled,
                                     derived=derived, constants=constants, all_columns=list(raw.columns),
                                     link_rate=link_rate, snap_rate=snap_rate,
                                     code_column="code" if name == "condition" and "code" in df else None,
                                     code_stats=code_stats, decimals=decimals, concepts=concepts,
                                     free_text=free, value_codes=value_codes, timing=timing,
                                     count_codes=count_codes, strata_stats=strata_stats, counted_by=counted_by,
                                     total_from_root=total_from_root)
        del raw
    flags: list[str] = []
    cond = tables.get("condition")
    if flags_top and cond is not None and "code" in cond and not cond.empty and "condition" in children:
        prev = cond.dropna(subset=["code"]).drop_duplicates([KEY, "code"]).groupby("code")[KEY].nunique()
        flags = list(prev.sort_values(ascending=False, kind="stable").index[:flags_top])
    if extra_flags and cond is not None and "code" in cond and "condition" in children:
        present = set(cond["code"].dropna().astype(str))
        flags += [c for c in dict.fromkeys(map(str, extra_flags)) if c in present and c not in map(str, flags)]
    context = ["ctx_age_band"] + (["ctx_gender"] if "gender" in root_cols else []) + [flag_column(c) for c in flags]
    return Layout(root_columns=root_cols, root_all_columns=list(patient.columns), root_constants=consts,
                  children=children, flags=flags, context=context, reference=ref, age_band_years=age_band_years)


# -- event timing inside encounters ----------------------------------------------------------------------
#: quantiles kept of a linked row's position inside its encounter (aggregates of the real rows, no row)
POSITION_QUANTILES = 41


#: an encounter class gets its own timing statistics with at least this many linked rows (else the pooled ones)
TIMING_MIN_ROWS = 200
#: a distinct time at most this many seconds after the encounter's previous one is "near" it: results of one
#: draw or one round of vital signs, stamped seconds apart. Real inpatient stays (clinosim cohort 23): 59 % of the
#: gaps between consecutive distinct times are under a minute (median 25 s) in stays of 161 h (median)
NEAR_SECONDS = 60.0
#: only in encounters longer than this (seconds): in a short visit (a check-up of 20 minutes) the times drawn
#: at their own positions are already minutes apart
NEAR_MIN_STAY = 3600.0
#: quantiles kept of the near gaps (seconds)
NEAR_QUANTILES = 21


def _position_stats(rows: pd.DataFrame) -> dict[str, Any]:
    """``first_at_start``, ``at_start``, ``new_time``, ``u_quantiles`` of linked rows (columns enc, t, start,
    end): see :func:`encounter_timing`."""
    pts = rows.drop_duplicates(["enc", "t"])
    groups = pts["enc"].nunique()
    n_rows = int(len(rows))
    earliest = pts.sort_values("t", kind="stable").drop_duplicates("enc")
    first_at_start = float((earliest["t"] == earliest["start"]).mean()) if len(earliest) else 0.0
    new_time = (len(pts) - groups) / (n_rows - groups) if n_rows > groups else 1.0
    # positions as the rows have them (a panel of many rows at one time weighs as its rows)
    at = rows["t"] == rows["start"]
    dur = (rows["end"] - rows["start"]).dt.total_seconds()
    u = ((rows["t"] - rows["start"]).dt.total_seconds() / dur.where(dur > 0))[~at].dropna()
    qs = np.quantile(u.to_numpy(dtype=float), np.linspace(0, 1, POSITION_QUANTILES)).tolist() if len(u) else []
    # the gaps between an encounter's consecutive distinct times: the share within NEAR_SECONDS, their quantiles
    long = pts[(pts["end"] - pts["start"]).dt.total_seconds() > NEAR_MIN_STAY].sort_values(["enc", "t"], kind="stable")
    gap = long.groupby("enc", sort=False)["t"].diff().dt.total_seconds().dropna().to_numpy(dtype=float)
    near = gap[gap <= NEAR_SECONDS]
    nq = np.quantile(near, np.linspace(0, 1, NEAR_QUANTILES)).tolist() if near.size else []
    return {"at_start": round(float(at.mean()), 6), "first_at_start": round(first_at_start, 6),
            "new_time": round(float(np.clip(new_time, 0.0, 1.0)), 6),
            "u_quantiles": [round(float(x), 6) for x in qs], "points": int(len(pts)),
            "near_share": round(float(near.size / gap.size), 6) if gap.size else 0.0,
            "near_quantiles": [round(float(x), 3) for x in nq]}


def encounter_timing(df: pd.DataFrame, enc: pd.DataFrame | None, time: str) -> dict[str, Any]:
    """Where the real rows that reference an encounter sit inside it, as aggregates: the rows of one encounter
    share a few distinct times (a panel of vital signs at one moment), ``new_time`` the chance that a further
    row opens a new time; the first time of an encounter is its start as often as real ones' is
    (``first_at_start``; ``at_start``: the share of the rows at the start), any other time at a position
    u = (time - start) / (end - start) drawn from ``u_quantiles`` (of the rows not at the start; u < 0 or > 1:
    before or after the encounter, as real rows can be). The same per encounter class (``by_class``, classes
    with :data:`TIMING_MIN_ROWS` rows: a check-up's panel is not an inpatient stay's), and the share of the rows
    without an encounter that sit at one of the patient's encounter starts (``unlinked_at_start``). Empty when
    no linked row has a time."""
    if enc is None or enc.empty or ENC_KEY not in df or not {"start", ENC_KEY} <= set(enc.columns):
        return {}
    e = enc[[ENC_KEY, "start"] + [c for c in ("end", "class_code") if c in enc]].drop_duplicates(ENC_KEY)
    rows = df.loc[df[ENC_KEY].notna() & df[time].notna(), [ENC_KEY, time]].merge(e, on=ENC_KEY, how="inner")
    if rows.empty:
        return {}
    start = _naive_utc(rows["start"])
    r = pd.DataFrame({"enc": rows[ENC_KEY].to_numpy(), "t": _naive_utc(rows[time]).to_numpy(),
                      "start": start.to_numpy(),
                      "end": (_naive_utc(rows["end"]) if "end" in rows else start).to_numpy(),
                      "cls": rows["class_code"].astype(object).to_numpy() if "class_code" in rows else None})
    r = r.dropna(subset=["t", "start"])
    r["end"] = r["end"].where(r["end"].notna(), r["start"])
    out = _position_stats(r)
    out["by_class"] = {str(c): _position_stats(g) for c, g in r.dropna(subset=["cls"]).groupby("cls")
                       if len(g) >= TIMING_MIN_ROWS}
    # rows without an encounter that still sit at one of the patient's encounter starts (a blood type, a
    # smoking status recorded at a visit): their share
    free = df.loc[df[ENC_KEY].isna() & df[time].notna(), [KEY, time]]
    starts = enc[[KEY, "start"]].dropna()
    unlinked = 0.0
    if len(free) and len(starts):
        hit = pd.MultiIndex.from_arrays([free[KEY].astype(str), _naive_utc(free[time])]).isin(
            pd.MultiIndex.from_arrays([starts[KEY].astype(str), _naive_utc(starts["start"])]))
        unlinked = float(hit.mean())
    out["unlinked_at_start"] = round(unlinked, 6)
    out["coverage"] = round(float(e[ENC_KEY].isin(set(r["enc"])).mean()), 6)  # share of encounters with rows
    return out


#: the patients' encounter counts whose gaps are kept apart (a patient with 2 encounters in the extract has
#: other gaps than one with 12): the upper edges of the count buckets
GAP_BUCKETS = (2, 3, 5, 8, 13, 21)


def _gap_bucket(n: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(GAP_BUCKETS), np.asarray(n), side="left")


def encounter_gaps(enc: pd.DataFrame, time: str) -> dict[str, Any]:
    """The days between a patient's consecutive encounters, as quantiles per bucket of the patient's encounter
    count (aggregates: no row), and the extract's time window (its first and last encounter): what
    :func:`space_encounters` redraws a synthetic patient's encounter times from."""
    t = _naive_utc(enc[time])
    d = pd.DataFrame({KEY: enc[KEY].to_numpy(), "t": t.to_numpy()}).dropna().sort_values([KEY, "t"], kind="stable")
    if d.empty:
        return {}
    n = d.groupby(KEY)["t"].transform("size").to_numpy()
    gap = (d.groupby(KEY)["t"].diff().dt.total_seconds() / 86400.0).to_numpy()
    ok = ~np.isnan(gap)
    bucket = _gap_bucket(n)
    # the window to whole days (no encounter's own instant is kept)
    out: dict[str, Any] = {"quantiles": {}, "window": [str(d["t"].min().floor("D")),
                                                       str(d["t"].max().floor("D") + pd.Timedelta(days=1))]}
    all_q = np.quantile(gap[ok], np.linspace(0, 1, POSITION_QUANTILES)).tolist() if ok.any() else [0.0]
    for b in range(len(GAP_BUCKETS) + 1):
        g = gap[ok & (bucket == b)]
        # a bucket with few gaps borrows the pooled quantiles (a small cell is never described on its own)
        qs = np.quantile(g, np.linspace(0, 1, POSITION_QUANTILES)).tolist() if g.size >= 50 else all_q
        out["quantiles"][str(b)] = [round(float(x), 4) for x in qs]
    # the days from a patient's first to last encounter, per bucket: a sum of independently drawn gaps spreads
    # wider than the real spans (clino_41: span median 237 vs 268 days, 90 % 359 vs 326, 20 patients beyond the
    # real longest 385 days), so the drawn gaps are scaled to a span drawn from these
    first = np.r_[True, d[KEY].to_numpy()[1:] != d[KEY].to_numpy()[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:] - 1, len(d) - 1]
    tt = d["t"].to_numpy()
    span = (tt[ends] - tt[starts]) / np.timedelta64(1, "s") / 86400.0
    pb = bucket[starts]
    multi = n[starts] >= 2
    all_s = np.quantile(span[multi], np.linspace(0, 1, POSITION_QUANTILES)).tolist() if multi.any() else [0.0]
    out["spans"] = {}
    for b in range(len(GAP_BUCKETS) + 1):
        s = span[multi & (pb == b)]
        qs = np.quantile(s, np.linspace(0, 1, POSITION_QUANTILES)).tolist() if s.size >= 50 else all_s
        out["spans"][str(b)] = [round(float(x), 4) for x in qs]
    # how long an encounter of each class lasts (seconds; classes with >= 50 encounters): an inpatient stay is
    # days, a check-up minutes, which the row model may not tell apart for a rare class (leaf size)
    if "end" in enc.columns and "class_code" in enc.columns:
        dur = (_naive_utc(enc["end"]) - t).dt.total_seconds()
        dd = pd.DataFrame({"c": enc["class_code"].astype(object).to_numpy(), "d": dur.to_numpy()}).dropna()
        out["durations"] = {str(c): [round(float(x), 1) for x in np.quantile(g["d"].to_numpy(dtype=float),
                                                                             np.linspace(0, 1, POSITION_QUANTILES))]
                            for c, g in dd.groupby("c") if len(g) >= 50}
    return out


def space_encounters(df: pd.DataFrame, cl: ChildLayout, birth: pd.Series, death: pd.Series, ref: pd.Timestamp,
                     rng: np.random.Generator, stats: dict) -> pd.DataFrame:
    """A synthetic patient's encounters, drawn row by row, get their times again as a sequence: the rows in
    their drawn order, the days between them from the real gaps of patients with as many encounters
    (:func:`encounter_gaps`), the sequence centred where the drawn times were and moved (compressed when
    longer) into what the patient can have: after the birth and the extract's first encounter, before the
    death and the reference date. Later times (the end) keep their distance to the start."""
    g = cl.timing["gaps"]
    if df.empty or not g or not cl.time:
        return df
    ref_naive = ref.tz_convert(None) if ref.tzinfo else ref
    w0 = pd.Timestamp(g["window"][0])
    w1 = min(pd.Timestamp(g["window"][1]), ref_naive)
    df = df.copy()
    t = pd.to_datetime(df[cl.time])
    day = np.timedelta64(86400, "s")
    d = pd.DataFrame({"k": df[KEY].to_numpy(), "t": t.to_numpy(), "i": np.arange(len(df))}).dropna(subset=["t"])
    d = d.sort_values(["k", "t"], kind="stable")
    k = d["k"].to_numpy()
    first = np.r_[True, k[1:] != k[:-1]]
    grp = np.cumsum(first) - 1
    n = np.bincount(grp)[grp]
    qs = {int(b): v for b, v in g["quantiles"].items()}
    bucket = _gap_bucket(n)
    u = rng.random(len(d))
    gap = np.zeros(len(d))
    for b, q in qs.items():
        sel = (bucket == b) & ~first
        gap[sel] = from_quantiles(q, u[sel])
    csum = np.cumsum(gap)  # rel: days after the patient's first encounter
    starts = np.flatnonzero(first)
    rel = csum - np.repeat(csum[starts], np.diff(np.r_[starts, len(d)]))
    span = np.repeat(rel[np.r_[starts[1:] - 1, len(d) - 1]], np.diff(np.r_[starts, len(d)]))
    if g.get("spans"):  # the gaps scaled to a span drawn from the real spans of patients with as many encounters
        target = np.zeros(len(d))
        us = np.repeat(rng.random(len(starts)), np.diff(np.r_[starts, len(d)]))
        for b, q in g["spans"].items():
            sel = bucket == int(b)
            target[sel] = from_quantiles(q, us[sel])
        scale = np.where(span > 0, target / np.maximum(span, 1e-9), 1.0)
        rel, span = rel * scale, span * scale
    tt = d["t"].to_numpy().astype("datetime64[ns]")
    t_first = np.repeat(tt[starts], np.diff(np.r_[starts, len(d)]))
    t_last = np.repeat(tt[np.r_[starts[1:] - 1, len(d) - 1]], np.diff(np.r_[starts, len(d)]))
    centre = t_first + (t_last - t_first) / 2
    lo = np.maximum(pd.Series(k).map(birth).to_numpy(dtype="datetime64[ns]"), np.datetime64(w0, "ns"))
    lo = np.where(np.isnat(lo), np.datetime64(w0, "ns"), lo)
    hi = pd.Series(k).map(death).to_numpy(dtype="datetime64[ns]")
    hi = np.where(np.isnat(hi) | (hi > np.datetime64(w1, "ns")), np.datetime64(w1, "ns"), hi)
    hi = np.maximum(hi, lo)
    room = (hi - lo) / day
    # a sequence longer than the room is compressed to 80-100 % of it (all of it would put the patient's first
    # and last encounters on the window's edges)
    fill = np.repeat(0.8 + 0.2 * rng.random(len(starts)), np.diff(np.r_[starts, len(d)]))
    squeeze = np.where((span > room) & (span > 0), fill * room / np.maximum(span, 1e-9), 1.0)
    rel, span = rel * squeeze, span * squeeze
    begin = centre - (span / 2 * 86400).astype("int64").astype("timedelta64[s]")
    last_begin = hi - (span * 86400).astype("int64").astype("timedelta64[s]")
    # a sequence that does not fit where it was drawn goes anywhere it fits (clamping it to an edge would pile
    # the patients' first or last encounters on the window's first or last instant)
    out_of_room = (begin < lo) | (begin > last_begin)
    room_s = np.maximum((last_begin - lo) / np.timedelta64(1, "s"), 0.0)
    anywhere = lo + (rng.random(len(d)) * room_s).astype("int64").astype("timedelta64[s]")
    per_patient = np.repeat(anywhere[starts], np.diff(np.r_[starts, len(d)]))  # one draw per patient
    begin = np.where(out_of_room, per_patient, begin)
    new_t = begin + (rel * 86400).astype("int64").astype("timedelta64[s]")
    shift = new_t - tt
    col = df.columns.get_loc(cl.time)
    idx = d["i"].to_numpy()
    df.iloc[idx, col] = new_t
    for c in cl.later_times:
        if c in df:
            later = pd.to_datetime(df[c].iloc[idx]).to_numpy()
            df.iloc[idx, df.columns.get_loc(c)] = np.where(pd.isna(later), later, later + shift)
    durations = g.get("durations") or {}
    if durations and "end" in cl.later_times and "class_code" in df.columns:  # the class's own length of stay
        cls = df["class_code"].astype(object).to_numpy()
        end = pd.to_datetime(df["end"]).to_numpy()
        start = pd.to_datetime(df[cl.time]).to_numpy()
        redrawn = 0
        for c, q in durations.items():
            sel = (cls == c) & ~pd.isna(end) & ~pd.isna(start)
            if sel.any():
                secs = from_quantiles(q, rng.random(int(sel.sum())))
                end[sel] = start[sel] + (secs * 1e9).astype("int64").astype("timedelta64[ns]")
                redrawn += int(sel.sum())
        df["end"] = end
        stats[f"{cl.name}_duration_redrawn"] = redrawn
    stats[f"{cl.name}_respaced"] = int(len(d))
    stats[f"{cl.name}_rows_in_compressed_sequences"] = int((squeeze < 1).sum())
    return df


ENC_CLASS = "__encounter_class"
#: a row's context column of a table with per-code counts: how many rows of the row's code its patient has
#: (:func:`code_n_bucket`), drawn right after the code (given, for a counted code): a value follows how often
#: the patient has it measured. Measured on clino_41: patients with one glucose value, real median 97, were
#: drawn at 103 without it (the values of monitored diabetics mixed in); the patients' last glucose median
#: 105.5 vs 98 real
CODE_N = "__code_n"
NO_ENCOUNTER = "__none"


def uses_encounter_class(cl: ChildLayout, tables: dict[str, pd.DataFrame]) -> bool:
    """A child table whose rows reference encounters that have a class: the class of a row's encounter
    (``NO_ENCOUNTER``: none) is a column of its CART model, drawn with the row (a procedure in an inpatient
    stay, a vital-signs panel at a check-up)."""
    enc = tables.get(ENCOUNTER)
    return bool(cl.link_rate and cl.time and enc is not None and "class_code" in enc.columns
                and enc["class_code"].notna().any())


def encounter_classes(df: pd.DataFrame, enc: pd.DataFrame | None) -> np.ndarray:
    """The class of each row's encounter (``NO_ENCOUNTER`` for a row without one or whose class is unknown)."""
    if enc is None or ENC_KEY not in df.columns or "class_code" not in enc.columns:
        return np.full(len(df), NO_ENCOUNTER, dtype=object)
    cls = df[ENC_KEY].map(enc.drop_duplicates(ENC_KEY).set_index(ENC_KEY)["class_code"])
    return cls.astype(object).where(cls.notna(), NO_ENCOUNTER).to_numpy()


#: a table with at most this many rows per referenced encounter draws its rows given the kinds of encounter the
#: patient has. rel-time measured on clino_23 (before the per-code counts) observation quality / reference 0.945
#: with, 0.971 without, and kept observation panels without it. With the per-code counts (rel-fit) a counted row
#: is drawn given its code only, so without the context 25 % of the observation rows (clino_41: 28,217) drew a
#: class the patient has no encounter of and went, with that class's values, into an encounter of another
#: class: observation interval KS 0.075 / 0.094 (seeds 41 / 23; reference 0.006 / 0.018, refused). With the
#: context for every table (and :func:`redraw_absent_classes`): 0.053 / 0.069, observation quality 0.946 / 0.933
#: (reference 0.947 / 0.939): every table now draws given the patient's kinds of encounter
ENCOUNTER_CONTEXT_MAX_ROWS = float("inf")


def rows_per_encounter(df: pd.DataFrame) -> float:
    """Mean rows per referenced encounter of a child table."""
    linked = df[ENC_KEY].dropna() if ENC_KEY in df.columns else pd.Series(dtype=object)
    return float(len(linked) / max(1, linked.nunique()))


#: Measured on clino_41 (820 train patients, cart): encounter class drawn with the row and the encounter
#: nearest in time of that class (relaxed to any class when the patient has none of it); the rows of a table
#: drawn given the kinds of encounter the patient has; the encounters given the size of the rest of the record
#: (``load_context``): observation rows whose patient lacked the drawn class 37,370 -> 160, procedure interval
#: KS 0.45 -> 0.21-0.39 (reference 0.20 +- 0.12), observation quality 0.915 -> 0.909 (reference 0.911).


def load_context(root: pd.DataFrame, tables: list[str]) -> pd.DataFrame:
    """Per patient: the size of each of ``tables`` in the record, ``ctx_load_<table>`` = floor(log2(rows + 1))
    (from the patient model's ``n_<table>``), the encounter model's context. Integers, so the trees split on
    "at least this large" (as string categories they split on an arbitrary order of the buckets: on clinosim
    cohort 23, synthetic patients with >= 255 observations had an inpatient stay in 35-43 %, with integers
    49-53 %, real 98 %; observation interval KS 0.071-0.072 -> 0.065-0.069)."""
    out = pd.DataFrame({KEY: root[KEY].astype(str).to_numpy()})
    for t in tables:
        col = count_column(t)
        n = pd.to_numeric(root[col], errors="coerce").fillna(0).clip(lower=0).to_numpy() if col in root else \
            np.zeros(len(root))
        out[f"ctx_load_{t}"] = np.floor(np.log2(n + 1)).astype("int64")
    return out


def encounter_class_list(enc: pd.DataFrame, top: int = 6) -> list[str]:
    """The encounter classes (the ``top`` most frequent) whose presence is a child model's context."""
    vc = enc["class_code"].dropna().astype(str).value_counts()
    return list(vc.index[:top])


def encounter_context(enc: pd.DataFrame, keys: pd.Series, classes: list[str]) -> pd.DataFrame:
    """Per patient (``keys``): does the patient have an encounter of each class (``ctx_enc_<class>``)."""
    out = pd.DataFrame({KEY: pd.Series(keys).astype(str).to_numpy()})
    held = enc.dropna(subset=["class_code"])
    for c in classes:
        who = set(held.loc[held["class_code"].astype(str) == c, KEY].astype(str))
        out[f"ctx_enc_{re.sub(r'[^a-z0-9]+', '_', c.lower()).strip('_')}"] = out[KEY].isin(who).to_numpy()
    return out


def link_by_class(df: pd.DataFrame, cl: ChildLayout, enc: pd.DataFrame, stats: dict) -> pd.DataFrame:
    """Link each row whose drawn encounter class is not ``NO_ENCOUNTER`` to one of the same patient's synthetic
    encounters of that class: shared out over them (:func:`_spread_over_encounters`) for a table nearly every
    real encounter has (``coverage`` >= :data:`SPREAD_COVERAGE`: vital signs), else the one nearest in time
    (medications at some visits only); none of that class: the nearest of any class, counted."""
    df = df.copy()
    want = df[ENC_CLASS].astype(object).ne(NO_ENCOUNTER) & df[cl.time].notna()
    d = df.loc[want, [KEY, cl.time, ENC_CLASS]].reset_index()
    e = enc[[KEY, ENC_KEY, "start", "class_code"]].dropna(subset=["start"]).rename(
        columns={"start": "__enc_start", "class_code": ENC_CLASS})
    linked = 0
    if len(d) and len(e):
        d[ENC_CLASS] = d[ENC_CLASS].astype(str)
        e[ENC_CLASS] = e[ENC_CLASS].astype(str)
        if float((getattr(cl, "timing", None) or {}).get("coverage", 0.0)) >= SPREAD_COVERAGE:
            m = _spread_over_encounters(d, e, cl.time)
        else:
            m = pd.merge_asof(d.sort_values(cl.time, kind="stable"), e.sort_values("__enc_start", kind="stable"),
                              left_on=cl.time, right_on="__enc_start", by=[KEY, ENC_CLASS], direction="nearest")
        miss = m[ENC_KEY].isna()
        if miss.any():
            m2 = pd.merge_asof(m.loc[miss, [KEY, cl.time, "index"]].sort_values(cl.time, kind="stable"),
                               e.drop(columns=[ENC_CLASS]).sort_values("__enc_start", kind="stable"),
                               left_on=cl.time, right_on="__enc_start", by=KEY, direction="nearest")
            stats[f"{cl.name}_encounter_class_relaxed"] = stats.get(f"{cl.name}_encounter_class_relaxed", 0) \
                + int(m2[ENC_KEY].notna().sum())
            m = pd.concat([m.loc[~miss, ["index", ENC_KEY]], m2[["index", ENC_KEY]]], ignore_index=True)
        m = m.dropna(subset=[ENC_KEY])
        df.loc[m["index"].to_numpy(), ENC_KEY] = m[ENC_KEY].to_numpy()
        linked = len(m)
    stats[f"{cl.name}_linked_to_encounter"] = stats.get(f"{cl.name}_linked_to_encounter", 0) + int(linked)
    return df


#: a table at least this share of the real encounters have rows of is shared out over every encounter
#: (measured on clino_41: observations, coverage 0.99, rows-per-encounter KS 0.33 -> 0.16; medication requests,
#: coverage 0.60, 0.08 -> 0.14 when shared out, so they keep nearest-in-time linking)
SPREAD_COVERAGE = 0.9


def _spread_over_encounters(d: pd.DataFrame, e: pd.DataFrame, time: str) -> pd.DataFrame:
    """The rows of a patient wanting a class, in the order of their drawn times, shared out over the patient's
    encounters of that class in time order (row i of m to encounter floor(i E / m) of E): every visit gets its
    share of the rows, as real visits each have their panel (nearest-in-time linking piled the rows of a
    patient onto the few encounters near the drawn times: rows-per-encounter KS 0.33, reference 0.05, on
    clino_41's observations). Columns: ``index``, the row's own, and ``encounter_key`` (NaN: no such class)."""
    d = d.sort_values([KEY, ENC_CLASS, time], kind="stable").copy()
    g = d.groupby([KEY, ENC_CLASS], sort=False)
    d["__i"], d["__m"] = g.cumcount().to_numpy(), g[time].transform("size").to_numpy()
    e = e.sort_values([KEY, ENC_CLASS, "__enc_start"], kind="stable").copy()
    ge = e.groupby([KEY, ENC_CLASS], sort=False)
    e["__j"], e["__n"] = ge.cumcount().to_numpy(), ge["__enc_start"].transform("size").to_numpy()
    d = d.merge(e[[KEY, ENC_CLASS, "__n"]].drop_duplicates([KEY, ENC_CLASS]), on=[KEY, ENC_CLASS], how="left")
    d["__j"] = np.floor(d["__i"] * d["__n"] / d["__m"]).where(d["__n"].notna())
    m = d.merge(e[[KEY, ENC_CLASS, "__j", ENC_KEY, "__enc_start"]], on=[KEY, ENC_CLASS, "__j"], how="left")
    return m.drop(columns=["__i", "__m", "__n", "__j"])


def _unlinked_to_starts(df: pd.DataFrame, cl: ChildLayout, enc: pd.DataFrame, share: float,
                        rng: np.random.Generator, stats: dict) -> pd.DataFrame:
    """Rows without an encounter: ``share`` of them (as often as real ones) at the start of the same
    patient's encounter nearest in time."""
    pick = df[ENC_KEY].isna().to_numpy() & df[cl.time].notna().to_numpy() & (rng.random(len(df)) < share)
    if not pick.any():
        return df
    d = pd.DataFrame({KEY: df[KEY].to_numpy()[pick], "t": pd.to_datetime(df[cl.time]).to_numpy()[pick],
                      "i": np.flatnonzero(pick)}).sort_values("t", kind="stable")
    e = enc[[KEY, "start"]].dropna().sort_values("start", kind="stable")
    m = pd.merge_asof(d, e, left_on="t", right_on="start", by=KEY, direction="nearest").dropna(subset=["start"])
    if m.empty:
        return df
    df = df.copy()
    shift = m["start"].to_numpy() - m["t"].to_numpy()
    df.iloc[m["i"].to_numpy(), df.columns.get_loc(cl.time)] = m["start"].to_numpy()
    for c in cl.later_times:
        if c in df:
            later = pd.to_datetime(df[c].iloc[m["i"].to_numpy()]).to_numpy()
            df.iloc[m["i"].to_numpy(), df.columns.get_loc(c)] = np.where(pd.isna(later), later, later + shift)
    stats[f"{cl.name}_unlinked_at_encounter_start"] = stats.get(f"{cl.name}_unlinked_at_encounter_start", 0) + \
        int(len(m))
    return df


def place_in_encounters(df: pd.DataFrame, cl: ChildLayout, enc: pd.DataFrame, rng: np.random.Generator,
                        stats: dict) -> pd.DataFrame:
    """Re-time the rows linked to an encounter inside it, as the real rows sit (:func:`encounter_timing`): per
    encounter a few distinct times (at its start, or at a drawn position between start and end), each row at
    one of them; later times (an end) keep their distance to the row's time. Order kept: a child of an
    encounter falls inside it (or just around it, as often as the real rows do)."""
    tm = cl.timing
    if not tm or df.empty or not cl.time or enc is None or enc.empty or ENC_KEY not in df:
        return df
    df = _unlinked_to_starts(df, cl, enc, float(tm.get("unlinked_at_start", 0.0)), rng, stats)
    linked = np.flatnonzero(df[ENC_KEY].notna().to_numpy())
    if not linked.size:
        return df
    e = enc.drop_duplicates(ENC_KEY).set_index(ENC_KEY)
    keys = df[ENC_KEY].to_numpy()[linked]
    start = pd.to_datetime(pd.Series(keys).map(e["start"])).to_numpy()
    end = pd.to_datetime(pd.Series(keys).map(e["end"])).to_numpy() if "end" in e else start
    end = np.where(pd.isna(end), start, end)
    dur = (end - start).astype("timedelta64[ns]").astype("int64").astype(float)
    # each row's encounter class: the class's own statistics where the real rows had enough of it
    cls = pd.Series(keys).map(e["class_code"]).astype(object).to_numpy() if "class_code" in e else \
        np.full(keys.size, None, dtype=object)
    by_class = tm.get("by_class") or {}
    # rows of one encounter: the first opens a time, each further one a new time with chance new_time
    order = np.argsort(keys, kind="stable")
    k_sorted, c_sorted = keys[order], cls[order]
    stats_of = [by_class.get(str(c), tm) if c is not None else tm for c in c_sorted]
    new_time = np.array([float(x.get("new_time", 1.0)) for x in stats_of])
    first = np.r_[True, k_sorted[1:] != k_sorted[:-1]]
    opens = first | (rng.random(order.size) < new_time)
    point = np.cumsum(opens) - 1                         # the distinct time each (sorted) row takes
    n_points = int(point[-1]) + 1
    # an encounter's first time is its start as often as real ones' earliest time is; the others are not (two
    # times at the start would be one)
    first_point = np.zeros(n_points, dtype=bool)
    first_point[point[first]] = True
    point_stats = [None] * n_points
    for j in np.flatnonzero(opens):
        point_stats[point[j]] = stats_of[j]
    p_start = np.array([float(x.get("first_at_start", x.get("at_start", 0.0))) for x in point_stats])
    at_start = first_point & (rng.random(n_points) < p_start)
    draw = rng.random(n_points)
    u = np.zeros(n_points)
    ids = np.array([id(x) for x in point_stats])
    for key in np.unique(ids):
        sel = ids == key
        u[sel] = from_quantiles(point_stats[int(np.flatnonzero(sel)[0])].get("u_quantiles"), draw[sel])
    u = np.where(at_start, 0.0, u)
    # each distinct time at its position; a further time of an encounter is "near" the one before it (seconds
    # later: one draw's results, one round of vital signs) as often as real ones are, else at its own position
    dur_pt = np.zeros(n_points)
    dur_pt[point[opens]] = dur[order[opens]]
    off_pt = np.where(dur_pt > 0, u * dur_pt, 0.0)
    near_p = np.array([float(x.get("near_share", 0.0)) for x in point_stats])
    near = ~first_point & (dur_pt > NEAR_MIN_STAY * 1e9) & (rng.random(n_points) < near_p)
    if near.any():
        gap_s = np.zeros(n_points)
        draw = rng.random(n_points)
        for key in np.unique(ids[near]):
            sel = near & (ids == key)
            gap_s[sel] = from_quantiles(point_stats[int(np.flatnonzero(sel)[0])].get("near_quantiles"), draw[sel])
        run = np.cumsum(~near) - 1                       # the head (a time at its own position) each point follows
        heads = np.flatnonzero(~near)
        steps = np.cumsum(gap_s * 1e9)                   # ns
        off_pt = np.where(near, off_pt[heads[run]] + steps - steps[heads[run]], off_pt)
    offset = np.empty(order.size)
    offset[order] = off_pt[point]
    new_t = start + offset.astype("int64").astype("timedelta64[ns]")
    old_t = pd.to_datetime(df[cl.time].iloc[linked]).to_numpy()
    shift = np.where(pd.isna(old_t), np.timedelta64(0, "ns"), (new_t - old_t).astype("timedelta64[ns]"))
    col = df.columns.get_loc(cl.time)
    df = df.copy()
    df.iloc[linked, col] = new_t
    for c in cl.later_times:  # an end keeps its distance to the row's time
        if c in df:
            later = pd.to_datetime(df[c].iloc[linked]).to_numpy()
            df.iloc[linked, df.columns.get_loc(c)] = np.where(pd.isna(later), later, later + shift)
    stats[f"{cl.name}_placed_in_encounter"] = stats.get(f"{cl.name}_placed_in_encounter", 0) + int(linked.size)
    return df


def concept_codes(tables: dict[str, pd.DataFrame], concepts: list | None, limit: int = 5) -> tuple[str, ...]:
    """The real condition codes of ``concepts`` (at most ``limit`` per concept, the most frequent first)."""
    cond = tables.get("condition")
    if not concepts or cond is None or cond.empty or "code" not in cond:
        return ()
    from synthfactory.features import concept_mask

    out: list[str] = []
    for concept in concepts:
        hit = cond.loc[concept_mask(cond, concept), "code"].dropna().astype(str)
        out += list(hit.value_counts().index[:limit])
    return tuple(dict.fromkeys(out))


# -- frames ---------------------------------------------------------------------------------------
def _age_band(birth: pd.Series, ref: pd.Timestamp, years: int) -> pd.Series:
    ref_naive = ref.tz_convert(None) if ref.tzinfo else ref
    age = ((ref_naive - pd.to_datetime(birth, errors="coerce")).dt.days / 365.25).clip(lower=0, upper=119)
    lo = (np.floor(age / years) * years)
    out = lo.map(lambda v: f"{int(v):03d}-{int(v) + years - 1:03d}" if pd.notna(v) else "unknown")
    return out.astype(object)


def root_frame(tables: dict[str, pd.DataFrame], layout: Layout, counts: bool = True) -> pd.DataFrame:
    p = tables[ROOT]
    out = pd.DataFrame({KEY: p[KEY].astype(str).values})
    for c in layout.root_columns:
        s = p[c]
        if c in ("birth_date", "deceased_date") or pd.api.types.is_datetime64_any_dtype(s) or (
                s.dtype == object and s.dropna().map(lambda v: hasattr(v, "year")).all() and s.notna().any()):
            out[c] = _naive_utc(s).dt.normalize().values
        elif pd.api.types.is_bool_dtype(s) or c == "deceased":
            out[c] = s.fillna(False).astype(bool).values
        else:
            out[c] = s.astype(object).where(s.notna(), None).values
    if counts:
        for name in layout.children:
            n = tables[name].groupby(KEY).size()
            out[count_column(name)] = out[KEY].map(n).fillna(0).astype("int64").values
        if layout.flags:
            cond = tables["condition"]
            for code in layout.flags:
                holders = set(cond.loc[cond["code"] == code, KEY])
                out[flag_column(code)] = out[KEY].isin(holders).values
    return out


def context_frame(root: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """The context columns of each patient (by ``patient_key``)."""
    ctx = pd.DataFrame({KEY: root[KEY].values})
    ctx["ctx_age_band"] = _age_band(root["birth_date"], layout.reference, layout.age_band_years).values \
        if "birth_date" in root else "unknown"
    if "ctx_gender" in layout.context:
        ctx["ctx_gender"] = root["gender"].astype(object).where(root["gender"].notna(), "unknown").values
    for code in layout.flags:
        col = flag_column(code)
        ctx[col] = root[col].astype(bool).values if col in root else False
    return ctx


def code_n_bucket(n: Any) -> np.ndarray:
    """How many rows of its code the row's patient has, as floor(log2(n)) (1 -> 0, 2-3 -> 1, 4-7 -> 2, ...)."""
    return np.floor(np.log2(np.maximum(np.asarray(n, dtype=float), 1.0)))


def child_frame(tables: dict[str, pd.DataFrame], layout: Layout, name: str, ctx: pd.DataFrame,
                encounter_class: bool = False, code_n: bool = False) -> pd.DataFrame:
    cl = layout.children[name]
    df = _prepared(tables[name], cl.concepts, cl.free_text)
    out = df[[KEY, *cl.columns]].copy()
    if encounter_class:
        out[ENC_CLASS] = encounter_classes(tables[name], tables.get(ENCOUNTER))
    if code_n and "code" in out.columns:  # the patient's number of rows of the row's code (see CODE_N)
        codes = out["code"].astype(object).where(out["code"].notna(), "__none__").astype(str)
        out[CODE_N] = code_n_bucket(codes.groupby([out[KEY].astype(str), codes]).transform("size").to_numpy())
    for c in cl.columns:
        if _is_time(out[c]):
            out[c] = _naive_utc(out[c])
        elif not pd.api.types.is_numeric_dtype(out[c]) and not pd.api.types.is_bool_dtype(out[c]):
            out[c] = out[c].astype(object).where(out[c].notna(), None)
    for c in cl.code_stats:  # values standardised within their code (and count stratum, see stratum_stats)
        out[c] = standardise(cl, c, out)
    out = out.merge(ctx, on=KEY, how="inner")
    return out.drop(columns=[KEY])


def _decoder(cl: ChildLayout, stats: dict) -> Any:
    """Undo the within-code standardisation of a drawn pool and reject rows outside their code's value range."""
    def decode(df: pd.DataFrame) -> pd.DataFrame:
        if not cl.code_stats or df.empty:
            return df
        df = df.copy()
        keep = pd.Series(True, index=df.index)
        for c, st in cl.code_stats.items():
            code = df["code"].astype(str)
            mean, sd = code.map({k: v[0] for k, v in st.items()}), code.map({k: v[1] for k, v in st.items()})
            lo, hi = code.map({k: v[2] for k, v in st.items()}), code.map({k: v[3] for k, v in st.items()})
            val = (df[c] * sd + mean).round(cl.decimals.get(c, 6))
            df[c] = val.where(mean.notna(), df[c])
            keep &= df[c].isna() | lo.isna() | ((df[c] >= lo) & (df[c] <= hi))
        stats[f"{cl.name}_value_out_of_range_rejected"] = stats.get(f"{cl.name}_value_out_of_range_rejected", 0) \
            + int((~keep).sum())
        return df[keep]

    return decode


def _metadata(df: pd.DataFrame, table: str, categorical: tuple[str, ...] = ()) -> dict:
    from synthfactory.synthesize.engine import column_metadata

    cols = column_metadata(df)
    for c, meta in cols.items():
        if meta["sdtype"] == "datetime":
            meta.pop("datetime_format", None)
        if c in categorical or c.startswith("ctx_"):
            cols[c] = {"sdtype": "categorical"}
    return {"tables": {table: {"columns": cols}}, "METADATA_SPEC_VERSION": "V2"}


# -- CART children (child_kind: cart, the default) ----------------------------------------------------
EPOCH = pd.Timestamp("1970-01-01")


#: a code column with at least this many values gets a profile (below); a code's profile uses its own rows
#: when it has at least PROFILE_MIN_ROWS of them, else the pooled figure of all rows
PROFILE_MIN_CODES = 8
PROFILE_MIN_ROWS = 5
PROFILE_LEVELS = 2
#: a numeric child column with at most this many distinct real values is discrete (never smoothed)
DISCRETE_MAX_VALUES = 100


def code_profiles(t: pd.DataFrame, code: str, columns: list[str]) -> pd.DataFrame:
    """Per row, the profile of its code: for each later column, the code's median (numbers), share true (flags)
    or share of the column's most frequent levels (categories), computed over the real rows of that code.

    Why: CART splits a categorical predictor on thresholds of its integer encoding (arbitrary order), so with
    100+ condition codes and 50-100 rows per leaf a tree cannot tell acute codes (resolved, onset in the
    encounter year, linked to an encounter) from chronic ones (active, onset years before): measured on
    clino_23 the synthetic code x clinical_status similarity was 0.76 vs 0.87 real, onset KS 0.81 vs 0.97.
    The profile orders the codes by what follows them, so the trees group similar codes; it is a function of
    the drawn code (:class:`CartSynthesizer` ``derived``), never drawn itself, and a model internal only."""
    codes = t[code].astype(object).where(t[code].notna(), "__none__").astype(str)
    if codes.nunique() < PROFILE_MIN_CODES:
        return pd.DataFrame(index=t.index)
    size = codes.map(codes.value_counts())
    own = size >= PROFILE_MIN_ROWS
    out: dict[str, pd.Series] = {}

    def per_code(name: str, v: pd.Series, stat: str) -> None:
        pooled = float(v.median() if stat == "median" else v.mean())
        by = v.groupby(codes).transform(stat).where(own, pooled).astype("float64")
        if by.nunique() > 1:
            out[name] = by

    for c in columns:
        s = t[c]
        if pd.api.types.is_bool_dtype(s):
            per_code(f"__profile_{c}", s.astype("float64"), "mean")
        elif pd.api.types.is_numeric_dtype(s):
            per_code(f"__profile_{c}", pd.to_numeric(s, errors="coerce").astype("float64"), "median")
        else:
            levels = s.astype(object).where(s.notna(), "__none__").astype(str)
            for lv in list(levels.value_counts().index[:PROFILE_LEVELS]):
                per_code(f"__profile_{c}={lv}", (levels == lv).astype("float64"), "mean")
    return pd.DataFrame(out, index=t.index)


class CartChild:
    """One child table's model: sequential CART (:mod:`synthfactory.synthesize.cart`) over the patient's
    context first, then the concept code, then the other columns, behind the EHR-aware transforms (a value
    measured for some codes only is a ``__measured`` flag plus hot-deck filled values). The main event time is
    days before the reference date, later times are seconds after it. ``sample_given`` draws rows given
    the context (and, for flagged conditions, the code): no pools, no rejection."""

    def __init__(self, context: list[str], code: str | None, time: str | None, later: list[str],
                 reference: pd.Timestamp, seed: int = 0, min_leaf: int | str = "auto"):
        self.context = list(context)
        self.code = code
        self.time = time
        self.later = list(later)
        self.reference = reference.tz_convert(None) if reference.tzinfo else reference
        self.seed = int(seed)
        self.min_leaf = min_leaf
        self.encounter_classes: list[str] = []      # classes whose presence is context (encounter_context)
        self.load_tables: list[str] = []            # tables whose row counts are context (load_context)
        self.cart: Any = None
        self.transformer: Any = None
        self.code_values: tuple[np.ndarray, np.ndarray] | None = None  # real codes and their shares
        self.profile_columns: list[str] = []
        self.fit_info: dict[str, Any] = {}
        self.code_n = False                         # CODE_N drawn (or given) right after the code

    def _numbers(self, df: pd.DataFrame) -> pd.DataFrame:
        out = df.copy()
        if self.time and self.time in out:
            t = pd.to_datetime(out[self.time])
            out[self.time] = (self.reference - t).dt.total_seconds() / 86400.0
            for c in self.later:
                out[c] = (pd.to_datetime(out[c]) - t).dt.total_seconds()
        return out

    def fit(self, frame: pd.DataFrame) -> "CartChild":
        from synthfactory.synthesize.cart import CartSynthesizer
        from synthfactory.synthesize.transforms import EhrTransformer

        first = [c for c in self.context if c in frame] + ([self.code] if self.code in frame else [])
        self.code_n = bool(self.code in frame and CODE_N in frame)
        if self.code_n:
            first.append(CODE_N)
        enc = self._numbers(frame)
        self.transformer = EhrTransformer(seed=self.seed).fit(enc, exclude=tuple(first))
        t = self.transformer.transform(enc)
        rest = [c for c in t.columns if c not in first]
        cats = [c for c in rest if not pd.api.types.is_numeric_dtype(t[c]) and not pd.api.types.is_bool_dtype(t[c])]
        flags = [c for c in rest if pd.api.types.is_bool_dtype(t[c])]
        nums = [c for c in rest if c not in cats and c not in flags]
        profile = code_profiles(t, self.code, cats + flags + nums) if self.code in t else pd.DataFrame(index=t.index)
        self.profile_columns = list(profile.columns)
        t = pd.concat([t, profile], axis=1)
        order = first + self.profile_columns + cats + flags + nums
        # a value with few distinct real values (a medication's dose: 10 mg, rarely 40 or 80) is discrete: drawn as
        # a real leaf value, not smoothed (smoothing made 10.4 mg doses no one prescribes)
        discrete = [c for c in nums if t[c].nunique() <= DISCRETE_MAX_VALUES]
        self.cart = CartSynthesizer(min_leaf=self.min_leaf, seed=self.seed, visit_sequence=order,
                                    derived={c: self.code for c in self.profile_columns},
                                    no_smooth=discrete + ([CODE_N] if self.code_n else [])).fit(t[order])
        self.fit_info = dict(self.cart.fit_info)
        if self.code in frame:
            vc = frame[self.code].astype(object).dropna().value_counts(normalize=True)
            self.code_values = (vc.index.to_numpy(dtype=object), vc.to_numpy(dtype=float))
        return self

    def reseed(self, seed: int) -> None:
        self.cart.reseed(seed)

    def sample_given(self, given: pd.DataFrame) -> pd.DataFrame:
        if given.empty:
            return pd.DataFrame(columns=self.cart.columns)
        raw = self.cart.sample_given(given.reset_index(drop=True))
        out = self.transformer.inverse_transform(raw.drop(columns=getattr(self, "profile_columns", [])))
        if self.time and self.time in out:
            t = self.reference - pd.to_timedelta(out[self.time].astype(float), unit="D")
            out[self.time] = t
            for c in self.later:
                out[c] = t + pd.to_timedelta(out[c].astype(float), unit="s")
        return out

    def sample(self, num_rows: int) -> pd.DataFrame:  # unconditional (HMA-free benchmarks, smoke checks)
        first = self.cart.models[0]
        return self.sample_given(pd.DataFrame({first.name: self.cart.sample(num_rows)[first.name]}))


class DatesAsDays:
    """A root model fitted with dates as days since 1970 (so CART draws dates, never copies a real one as a
    category); ``sample`` gives dates back, a death never before the birth."""

    def __init__(self, inner: Any, dates: list[str]):
        self.inner = inner
        self.dates = list(dates)

    @staticmethod
    def encode(df: pd.DataFrame, dates: list[str]) -> pd.DataFrame:
        out = df.copy()
        for c in dates:
            out[c] = (pd.to_datetime(out[c]) - EPOCH).dt.days.astype("float64")
        return out

    def sample(self, num_rows: int) -> pd.DataFrame:
        df = self.inner.sample(num_rows=num_rows)
        for c in self.dates:
            df[c] = EPOCH + pd.to_timedelta(pd.to_numeric(df[c], errors="coerce").round(), unit="D")
        if {"birth_date", "deceased_date"} <= set(self.dates):
            early = df["deceased_date"].notna() & (df["deceased_date"] < df["birth_date"])
            df.loc[early, "deceased_date"] = df.loc[early, "birth_date"]
        return df

    def members(self) -> list[Any]:
        return [self.inner]

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)


# -- the model ------------------------------------------------------------------------------------
@dataclass
class RelationalModel:
    engine: str
    layout: Layout
    root: Any = None                                 # single-table synthesizer over root_frame (not for hma)
    children: dict[str, Any] = field(default_factory=dict)
    hma: Any = None
    root_kind: str = "gaussian_copula"
    child_kind: str = "gaussian_copula"
    fit_seconds: dict[str, float] = field(default_factory=dict)
    real_stats: dict[str, Any] = field(default_factory=dict)
    train_info: dict[str, Any] = field(default_factory=dict)
    context_values: dict[str, dict[str, tuple[list, Any]]] = field(default_factory=dict)  # par: seen values, mode
    code_counts: Any = None                          # CART: per-code counts given the patient's context and counts

    def members(self) -> list[Any]:
        return [m for m in (self.root, self.hma, self.code_counts, *self.children.values()) if m is not None]

    def save(self, path: str) -> None:
        import cloudpickle

        with open(path, "wb") as fh:
            cloudpickle.dump(self, fh)


def _root_constraints(root: pd.DataFrame) -> list:
    from sdv.cag import Inequality

    out = []
    if {"birth_date", "deceased_date"} <= set(root.columns):
        ok = root["deceased_date"].isna() | root["birth_date"].isna() | (root["deceased_date"] >= root["birth_date"])
        if ok.all() and root["deceased_date"].notna().any():
            out.append(Inequality("birth_date", "deceased_date"))
    return out


def _child_constraints(cl: ChildLayout, df: pd.DataFrame) -> list:
    from sdv.cag import Inequality

    return [Inequality(cl.time, c) for c in cl.later_times if df[c].notna().any()]


def fit(tables: dict[str, pd.DataFrame], *, engine: str = "patient_centred", root_kind: str = "gaussian_copula",
        root_params: dict | None = None, child_kind: str = "cart", child_params: dict | None = None,
        flags_top: int = 3, age_band_years: int = 20, reference: str | None = None, plan: Any = None,
        par_epochs: int = 64, constraint_specs: list | None = None, seed: int = 0,
        flag_concepts: list | None = None, count_codes: tuple[str, ...] = ()) -> RelationalModel:
    """Fit the relational model on the (training) flattened tables. ``constraint_specs`` (the spec's
    ``synthesizer.constraints``) add SDV constraints per table (``table: patient`` or a child table name).
    ``flag_concepts`` (spec ConditionConcepts, e.g. the condition of ``quality.trajectory``): their real codes
    become patient flags besides the ``flags_top`` most frequent, so the child rows (a lab's values) are drawn
    given them. ``count_codes`` (the spec's lab codes): observation codes whose count per patient the patient
    model draws besides the most informative ones (where enough patients have them)."""
    from synthfactory.kinds import DP
    from synthfactory.synthesize import engine as eng
    from synthfactory.synthesize.constraints import sdv_constraints

    specs = [c.model_copy(update={"table": ROOT}) if c.table == "patients" else c for c in (constraint_specs or [])]

    if engine not in ENGINES:
        raise RelationalError(f"synthesizer.relational.engine: unknown engine {engine!r}; choose one of {ENGINES}")
    if root_kind in DP:
        raise RelationalError("synthesizer.kind: the DP synthesizers cover one table; relational mode would leave "
                              "the child tables without a privacy guarantee. Use mode: patient_table for DP")
    layout = derive_layout(tables, flags_top=flags_top if engine != "hma" else 0, age_band_years=age_band_years,
                           reference=reference, extra_flags=concept_codes(tables, flag_concepts)
                           if engine != "hma" else (), extra_count_codes=tuple(count_codes))
    model = RelationalModel(engine=engine, layout=layout, root_kind=root_kind, child_kind=child_kind)
    model.real_stats = real_statistics(tables, layout)
    if engine == "hma":
        _fit_hma(model, tables)
        return model
    root = root_frame(tables, layout)
    root_train = root.drop(columns=[KEY])
    root_params = dict(root_params or {})
    if root_kind == "gaussian_copula":  # children counts: a KDE marginal (measured at 150 patients, KS of
        # n_condition 0.147 -> 0.007, n_encounter 0.12 -> 0.10, n_observation 0.17 -> 0.13 vs truncnorm; beta: 0.95)
        dists = dict(root_params.get("numerical_distributions") or {})
        for name in layout.children:
            dists.setdefault(count_column(name), "gaussian_kde")
        root_params["numerical_distributions"] = dists
    t0 = time.perf_counter()
    if root_kind == "cart":  # dates as numbers (never a real date copied as a category), EHR-aware transforms
        # children-per-patient counts are drawn as real leaf values (not smoothed): their lumps are the data
        # (measured on clino_41: medication requests per patient KS 0.102 smoothed, ref 0.040)
        root_params.setdefault("no_smooth", [count_column(n) for n in layout.children])
        # a count's positive part fitted on the patients who have that child at all (not on hot-deck fill-ins):
        # clinosim cohort 67: procedures per patient 0.43 -> 0.57, real 0.64 (bench/results/relational_cli.md)
        root_params.setdefault("gate_missing", True)
        if any(c.table == ROOT for c in specs):
            raise RelationalError("synthesizer.constraints on the patient table: not available with kind cart in "
                                  "relational mode; use kind gaussian_copula")
        dates = [c for c in root_train.columns if pd.api.types.is_datetime64_any_dtype(root_train[c])]
        enc = DatesAsDays.encode(root_train, dates)
        inner, _ = eng.fit(enc, "cart", root_params, _metadata(enc, "patients"), transforms="ehr", seed=seed)
        model.root = DatesAsDays(inner, dates)
    else:
        model.root, _ = eng.fit(root_train, root_kind, root_params, _metadata(root_train, "patients"),
                                plan=plan, constraints=_root_constraints(root_train) + sdv_constraints(
                                    specs, root_train, ROOT))
    if plan is not None and getattr(plan, "info", None):
        model.train_info = dict(plan.info)
    model.fit_seconds[ROOT] = round(time.perf_counter() - t0, 3)
    ctx = context_frame(root, layout)
    if any(cl.count_codes for cl in layout.children.values()) and engine == "patient_centred" and child_kind == "cart":
        # which labs a patient has: a second patient-level CART, drawn after the patient model (in the patient
        # model itself, 16 more columns moved its other counts: encounters per patient KS 0.011 -> 0.068)
        from synthfactory.synthesize.cart import CartSynthesizer

        t0 = time.perf_counter()
        frame = code_count_frame(tables, layout, root, ctx)
        counted = [c for n, cl in layout.children.items() if cl.count_codes
                   for c in [*cl.count_codes, other_count_column(n)]]
        model.code_counts = CartSynthesizer(seed=seed, visit_sequence=list(frame.columns), no_smooth=counted) \
            .fit(frame)
        model.fit_seconds["code_counts"] = round(time.perf_counter() - t0, 3)
    else:
        for cl in layout.children.values():
            cl.count_codes = {}
    for name in layout.order:
        t0 = time.perf_counter()
        cl = layout.children[name]
        code_n = bool(cl.count_codes) and "code" in cl.columns and engine == "patient_centred" and \
            child_kind == "cart"
        frame = child_frame(tables, layout, name, ctx, code_n=code_n)
        if engine == "par":
            model.children[name] = _fit_par(tables, layout, name, ctx, par_epochs)
            model.context_values[name] = {c: (list(frame[c].unique()), frame[c].mode().iloc[0])
                                          for c in layout.context if c in frame}
        elif child_kind == "cart":
            if any(c.table == name for c in specs):
                raise RelationalError(f"synthesizer.constraints on table {name}: not available with "
                                      "relational.child_kind cart; use child_kind gaussian_copula")
            try:
                by = getattr(cl, "counted_by", "code")
                child = CartChild(layout.context, "code" if "code" in cl.columns else (
                    by if cl.count_codes and by in cl.columns else None), cl.time,
                                  cl.later_times, layout.reference, seed=seed, **(child_params or {}))
            except TypeError as err:
                raise RelationalError(f"synthesizer.relational.child_params: {err} (child_kind cart takes "
                                      "min_leaf)") from None
            if name == ENCOUNTER and len(layout.children) > 1:  # a patient's encounters given the size of the
                # rest of the record (hundreds of observations come with an inpatient stay)
                loads = [n for n in layout.children if n != ENCOUNTER]
                lctx = load_context(root, loads)
                child.context = list(layout.context) + [c for c in lctx.columns if c != KEY]
                child.load_tables = loads
                frame = child_frame(tables, layout, name, ctx.merge(lctx, on=KEY, how="left"), code_n=code_n)
            if uses_encounter_class(cl, tables):  # which kind of encounter a row belongs to: drawn with the row
                frame = child_frame(tables, layout, name, ctx, encounter_class=True, code_n=code_n)
                if rows_per_encounter(tables[name]) <= ENCOUNTER_CONTEXT_MAX_ROWS:
                    # given which kinds of encounter the patient has (the encounters are drawn first)
                    classes = encounter_class_list(tables[ENCOUNTER])
                    ectx = encounter_context(tables[ENCOUNTER], ctx[KEY], classes)
                    child.context = list(layout.context) + [c for c in ectx.columns if c != KEY]
                    child.encounter_classes = classes
                    frame = child_frame(tables, layout, name, ctx.merge(ectx, on=KEY, how="left"),
                                        encounter_class=True, code_n=code_n)
            model.children[name] = child.fit(frame)
        else:
            params = dict(child_params) if child_params is not None else (
                {"default_distribution": "truncnorm"} if child_kind == "gaussian_copula" else {})
            model.children[name], _ = eng.fit(frame, child_kind, params, _metadata(frame, name),
                                              constraints=_child_constraints(cl, frame) + sdv_constraints(
                                                  specs, frame, name))
        model.fit_seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("relational fit table=%s rows=%d columns=%d engine=%s seconds=%.2f", name, len(frame),
                 frame.shape[1], engine, model.fit_seconds[name])
    return model


def _hma_frames(tables: dict[str, pd.DataFrame], layout: Layout) -> tuple[dict[str, pd.DataFrame], dict]:
    root = root_frame(tables, layout, counts=False)
    frames = {ROOT: root}
    meta_tables = {ROOT: _metadata(root.drop(columns=[KEY]), ROOT)["tables"][ROOT]}
    meta_tables[ROOT]["columns"][KEY] = {"sdtype": "id"}
    meta_tables[ROOT]["primary_key"] = KEY
    rels = []
    for name in layout.order:
        cl = layout.children[name]
        df = _prepared(tables[name], cl.concepts, cl.free_text)[[cl.key, KEY, *cl.columns]].copy()
        for c in cl.columns:
            if _is_time(df[c]):
                df[c] = _naive_utc(df[c])
            elif not pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]):
                df[c] = df[c].astype(object).where(df[c].notna(), None)
        frames[name] = df
        m = _metadata(df.drop(columns=[cl.key, KEY]), name)["tables"][name]
        m["columns"][cl.key] = {"sdtype": "id"}
        m["columns"][KEY] = {"sdtype": "id"}
        m["primary_key"] = cl.key
        meta_tables[name] = m
        rels.append({"parent_table_name": ROOT, "child_table_name": name, "parent_primary_key": KEY,
                     "child_foreign_key": KEY})
    return frames, {"tables": meta_tables, "relationships": rels, "METADATA_SPEC_VERSION": "V2"}


def _fit_hma(model: RelationalModel, tables: dict[str, pd.DataFrame]) -> None:
    from synthfactory.synthesize import engine as eng

    if len(model.layout.children) + 1 > 5:
        raise RelationalError(
            f"synthesizer.relational.engine: hma handles at most 5 tables (SDV's limit); this record has "
            f"{len(model.layout.children) + 1} ({', '.join([ROOT, *model.layout.children])}). Use engine: "
            "patient_centred (no table limit)")
    frames, meta = _hma_frames(tables, model.layout)
    t0 = time.perf_counter()
    model.hma, _ = eng.fit(frames, "hma", {}, meta)
    model.fit_seconds["hma"] = round(time.perf_counter() - t0, 3)


def _fit_par(tables: dict[str, pd.DataFrame], layout: Layout, name: str, ctx: pd.DataFrame, epochs: int) -> Any:
    from synthfactory.synthesize import engine as eng

    cl = layout.children[name]
    frame = _prepared(tables[name], cl.concepts, cl.free_text)[[KEY, *cl.columns]].copy()
    for c in cl.columns:
        if _is_time(frame[c]):
            frame[c] = _naive_utc(frame[c])
        elif not pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]):
            frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
    frame = frame.merge(ctx, on=KEY, how="inner")
    frame[KEY] = frame[KEY].astype(str)
    meta = _metadata(frame.drop(columns=[KEY]), name)
    meta["tables"][name]["columns"][KEY] = {"sdtype": "id"}
    meta["tables"][name]["sequence_key"] = KEY
    if cl.time:
        meta["tables"][name]["sequence_index"] = cl.time
    synth, _ = eng.fit(frame, "par", {"context_columns": list(layout.context), "epochs": epochs}, meta)
    return synth


# -- sampling -------------------------------------------------------------------------------------
def _match_keys(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    return pd.Series(list(zip(*[df[c].astype(str) for c in cols])), index=df.index) if cols else \
        pd.Series([()] * len(df), index=df.index)


def _plain_draw(synth: Any, n: int) -> pd.DataFrame:
    from synthfactory.synthesize.engine import sample_plain

    with contextlib.redirect_stderr(io.StringIO()):  # SDV's per-call tqdm bar: one per pool, noise in task logs
        return sample_plain(synth, n, table="")


def _fill(synth: Any, needs: dict[tuple, int], cols: list[str], bucket: Any, stats: dict,
          rounds: int = 3, pool_factor: float = 8.0, decode: Any = None) -> dict[tuple, pd.DataFrame]:
    """Draw rows for each context key (a tuple of ``cols`` values) from one child model: bulk pools matched
    on the key, then SDV conditional sampling for what is short, then relaxed matching (counted). Pools are
    large because a model call costs about the same for 50 or 5,000 rows, while every conditional call is a
    separate model call."""
    decode = decode or _identity

    def _draw(s: Any, n: int) -> pd.DataFrame:
        return decode(_plain_draw(s, n))

    out: dict[tuple, list[pd.DataFrame]] = {k: [] for k in needs}
    short = dict(needs)
    pool_rows = 0
    total = sum(short.values())
    size = int(max(min(pool_factor * total, 200_000), 1.5 * total, 2000))
    for _ in range(rounds):
        if not short:
            break
        pool = _draw(synth, size)
        size = int(max(min(size * 2, 400_000), 1.5 * sum(short.values())))
        pool_rows += len(pool)
        keys = _match_keys(bucket(pool), cols)
        groups = pool.groupby(keys.values, sort=False).indices if len(pool) else {}
        for k, n in list(short.items()):
            idx = groups.get(k)
            if n and idx is not None and len(idx):
                take = pool.iloc[idx[:n]]
                out[k].append(take)
                short[k] = n - len(take)
        short = {k: v for k, v in short.items() if v > 0}
    conditional = relaxed = 0
    if short and hasattr(synth, "sample_from_conditions"):
        from sdv.sampling import Condition

        for k, n in list(short.items()):
            values = dict(zip(cols, k))
            if any(v == OTHER for v in values.values()):
                continue
            typed = {c: (v == "True") if c.startswith("flag_") else v for c, v in values.items()}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = synth.sample_from_conditions([Condition(typed, num_rows=n)], max_tries_per_batch=3)
                got = decode(got if isinstance(got, pd.DataFrame) else next(iter(got.values())))
            except Exception:  # noqa: BLE001 - a context the model cannot produce: relax below
                continue
            if len(got):
                out[k].append(got.iloc[:n])
                conditional += min(n, len(got))
                short[k] = n - min(n, len(got))
        short = {k: v for k, v in short.items() if v > 0}
    if short:  # relax: keep only the last match column (the code bucket) or nothing
        pool = _draw(synth, int(sum(short.values()) * 4) + 64)
        for k, n in short.items():
            cand = pool
            if bucket is not _identity and cols:
                codes = bucket(pool)[cols[-1]].astype(str)
                cand = pool[codes == k[-1]]
            take = cand.sample(n=min(n, len(cand)), replace=len(cand) < n, random_state=0) if len(cand) else \
                pool.sample(n=n, replace=True, random_state=0)
            out[k].append(take)
            relaxed += len(take)
    stats["pool_rows"] = stats.get("pool_rows", 0) + pool_rows
    stats["conditional_rows"] = stats.get("conditional_rows", 0) + conditional
    stats["relaxed_rows"] = stats.get("relaxed_rows", 0) + relaxed
    return {k: (pd.concat(v, ignore_index=True) if v else pd.DataFrame()) for k, v in out.items()}


def _identity(df: pd.DataFrame) -> pd.DataFrame:
    return df


def _child_rows_pc(model: RelationalModel, name: str, root: pd.DataFrame, ctx: pd.DataFrame,
                   stats: dict) -> pd.DataFrame:
    """Patient-centred: ``n_<name>`` rows per synthetic patient, drawn given the patient's context."""
    layout = model.layout
    cl = layout.children[name]
    synth = model.children[name]
    counts = root[count_column(name)].clip(lower=0).astype(int).to_numpy().copy()
    cols = list(layout.context)
    ctx = ctx.reset_index(drop=True)
    keys = _match_keys(ctx, cols)
    bucket = _identity
    per_patient: list[list[tuple]] = [[] for _ in range(len(root))]
    if cl.code_column and layout.flags:
        flags = set(map(str, layout.flags))
        cols = cols + ["__code"]

        def bucket(df: pd.DataFrame) -> pd.DataFrame:  # noqa: F811 - code bucket for matching
            b = df.copy()
            b["__code"] = b[cl.code_column].astype(str).where(b[cl.code_column].astype(str).isin(flags), OTHER)
            return b

        fixed = 0
        for i in range(len(root)):
            flagged = [c for c in layout.flags if bool(root[flag_column(c)].iloc[i])]
            if len(flagged) > counts[i]:
                fixed += 1
                counts[i] = len(flagged)
            per_patient[i] = [keys.iloc[i] + (str(c),) for c in flagged] + \
                             [keys.iloc[i] + (OTHER,)] * (counts[i] - len(flagged))
        stats[f"{name}_count_raised_to_flags"] = fixed
    else:
        for i in range(len(root)):
            per_patient[i] = [keys.iloc[i]] * counts[i]
    needs: dict[tuple, int] = {}
    for lst in per_patient:
        for k in lst:
            needs[k] = needs.get(k, 0) + 1
    if not needs:
        return pd.DataFrame(columns=[KEY, *cl.columns])
    filled = _fill(synth, needs, cols, bucket, stats, decode=_decoder(cl, stats))
    cursor = {k: 0 for k in filled}
    rows, owners = [], []
    pkeys = root[KEY].values
    # hand the rows of each context key out to its patients in order
    take_idx: dict[tuple, list[int]] = {}
    for i, lst in enumerate(per_patient):
        for k in lst:
            take_idx.setdefault(k, []).append(i)
    for k, patients in take_idx.items():
        df = filled[k]
        if len(df) < len(patients):  # cannot happen (relax fills), but never silently drop a patient's row
            df = df.sample(n=len(patients), replace=True, random_state=0)
        rows.append(df.iloc[: len(patients)])
        owners.extend(pkeys[patients])
        cursor[k] = len(patients)
    out = pd.concat(rows, ignore_index=True)
    out.insert(0, KEY, owners)
    return out


def _destandardise(df: pd.DataFrame, cl: ChildLayout) -> pd.DataFrame:
    """Undo the within-code standardisation; values stay inside their code's real range (clipped)."""
    if not cl.code_stats or df.empty:
        return df
    code = df["code"].astype(str)
    for c, st in cl.code_stats.items():
        has = code.map({k: v[0] for k, v in st.items()}).notna()
        lo, hi = code.map({k: v[2] for k, v in st.items()}), code.map({k: v[3] for k, v in st.items()})
        val = pd.to_numeric(destandardise(cl, c, df), errors="coerce").clip(lower=lo, upper=hi)
        df[c] = val.round(cl.decimals.get(c, 6)).where(has, df[c])
    return df


#: rows whose drawn encounter class the patient has no encounter of are drawn again (code kept) at most this
#: many times (see :func:`redraw_absent_classes`)
CLASS_REDRAWS = 8


def absent_class(cls: pd.Series, keys: np.ndarray, encounters: pd.DataFrame) -> np.ndarray:
    """Per row: its drawn encounter class (``cls``) is one the patient (``keys``) has no encounter of."""
    cls = cls.astype(object).where(cls.notna(), NO_ENCOUNTER).astype(str)
    e = encounters.dropna(subset=["class_code"]) if "class_code" in encounters else encounters.iloc[:0]
    held = pd.MultiIndex.from_arrays([e[KEY].astype(str).to_numpy(), e["class_code"].astype(str).to_numpy()]) \
        if len(e) else pd.MultiIndex.from_arrays([[], []])
    has = pd.MultiIndex.from_arrays([pd.Series(keys).astype(str).to_numpy(), cls.to_numpy()]).isin(held)
    return (cls.to_numpy() != NO_ENCOUNTER) & ~has


def redraw_absent_classes(synth: "CartChild", out: pd.DataFrame, own: np.ndarray, root: pd.DataFrame,
                          ctx: pd.DataFrame, cols: list[str], encounters: pd.DataFrame, stats: dict,
                          name: str) -> pd.DataFrame:
    """A row drawn with an encounter class its patient has no encounter of (an inpatient glucose for a patient
    without a stay) is drawn again, its code kept, until its class is one the patient has: the row's class and
    values are then those of the code given the encounters the patient does have (rejection sampling,
    :data:`CLASS_REDRAWS` tries). Before, such a row was linked to an encounter of another class and kept its
    inpatient value: on clino_41 25 % of the observation rows (28,217), glucose in ambulatory visits median
    117 vs 103 real, the patients' last glucose median 120 vs 98."""
    keys = root[KEY].to_numpy()[own]
    bad = absent_class(out[ENC_CLASS], keys, encounters)
    first = int(bad.sum())
    for _ in range(CLASS_REDRAWS):
        if not bad.any():
            break
        rows = np.flatnonzero(bad)
        given = ctx.loc[own[rows], cols].reset_index(drop=True)
        given[synth.code] = out[synth.code].to_numpy()[rows]
        if getattr(synth, "code_n", False) and CODE_N in out.columns:
            given[CODE_N] = out[CODE_N].to_numpy(dtype=float)[rows]
        again = synth.sample_given(given)[out.columns]
        ok = ~absent_class(again[ENC_CLASS], keys[rows], encounters)
        if ok.any():
            again.index = out.index[rows]
            take = again.loc[again.index[ok]]
            for c in out.columns:  # column by column: dtypes of the two draws may differ (object vs number)
                out.loc[take.index, c] = take[c].to_numpy()
        bad[rows[ok]] = False
    stats[f"{name}_absent_class_drawn"] = stats.get(f"{name}_absent_class_drawn", 0) + first
    stats[f"{name}_absent_class_kept"] = stats.get(f"{name}_absent_class_kept", 0) + int(bad.sum())
    return out


def _child_rows_cart(model: RelationalModel, name: str, root: pd.DataFrame, ctx: pd.DataFrame, stats: dict,
                     rng: np.random.Generator, encounters: pd.DataFrame | None = None) -> pd.DataFrame:
    """``n_<name>`` rows per synthetic patient, drawn by the table's CART model given the patient's context;
    conditions honour the root's flags (one row per flagged code, no flagged code among the other rows)."""
    layout = model.layout
    cl = layout.children[name]
    synth: CartChild = model.children[name]
    counts = root[count_column(name)].clip(lower=0).astype(int).to_numpy().copy()
    ctx = ctx.reset_index(drop=True)
    cols = [c for c in (getattr(synth, "context", None) or layout.context) if c in synth.cart.columns]
    if getattr(synth, "load_tables", None):  # the size of the rest of the patient's record
        ctx = ctx.merge(load_context(root, synth.load_tables), on=KEY, how="left")
        for m in synth.cart.models:  # a model fitted when the buckets were string categories
            if m.name.startswith("ctx_load_") and not m.numeric and m.name in ctx:
                ctx[m.name] = ctx[m.name].astype(str)
    if getattr(synth, "encounter_classes", None):  # the kinds of encounter each synthetic patient has
        ectx = encounter_context(encounters, root[KEY], synth.encounter_classes) if encounters is not None else \
            pd.DataFrame({KEY: root[KEY].to_numpy()})
        ctx = ctx.merge(ectx, on=KEY, how="left")
        for c in ectx.columns:
            if c != KEY:
                ctx[c] = ctx[c].fillna(False).astype(bool)
    flagged: list[tuple[int, str]] = []
    n_of: np.ndarray | None = None
    exclusive: set[str] = set()  # codes whose rows per patient the root decided (flags, per-code counts)
    if cl.code_column and layout.flags and synth.code:
        held = np.column_stack([root[flag_column(c)].astype(bool).to_numpy() for c in layout.flags])
        n_flags = held.sum(axis=1)
        stats[f"{name}_count_raised_to_flags"] = int((n_flags > counts).sum())
        counts = np.maximum(counts, n_flags)
        flagged = [(i, str(layout.flags[j])) for i, j in zip(*np.nonzero(held))]
        exclusive = set(map(str, layout.flags))
        free = counts - n_flags
    elif cl.count_codes and synth.code and all(c in root for c in cl.count_codes):
        per = np.column_stack([root[c].clip(lower=0).astype(int).to_numpy() for c in cl.count_codes])
        n_fixed = per.sum(axis=1)
        stats[f"{name}_count_raised_to_codes"] = int((n_fixed > counts).sum())
        counts = np.maximum(counts, n_fixed)
        codes = list(cl.count_codes.values())
        for j, code in enumerate(codes):
            flagged += [(int(i), code) for i in np.repeat(np.arange(len(root)), per[:, j])]
        if getattr(synth, "code_n", False):  # each counted row knows how many of its code the patient has
            col = {c: j for j, c in enumerate(codes)}
            n_of = np.array([per[i, col[c]] for i, c in flagged], dtype=float)
        exclusive = set(codes)
        free = counts - n_fixed
    else:
        free = counts
    parts, owners = [], []
    if flagged:
        idx = np.array([i for i, _ in flagged])
        given = ctx.loc[idx, cols].reset_index(drop=True)
        given[synth.code] = [c for _, c in flagged]
        if n_of is not None:
            given[CODE_N] = code_n_bucket(n_of)
        parts.append(synth.sample_given(given))
        owners.append(idx)
    idx = np.repeat(np.arange(len(root)), free)
    if len(idx):
        got = synth.sample_given(ctx.loc[idx, cols].reset_index(drop=True))
        if flagged:  # other rows never carry a flagged/counted code: drawn again, then given another code
            flags = exclusive
            for _ in range(5):
                bad = np.flatnonzero(got[synth.code].astype(str).isin(flags).to_numpy())
                if not bad.size:
                    break
                again = synth.sample_given(ctx.loc[idx[bad], cols].reset_index(drop=True))[got.columns]
                again.index = got.index[bad]
                got.loc[again.index, again.columns] = again
            bad = np.flatnonzero(got[synth.code].astype(str).isin(flags).to_numpy())
            if bad.size and synth.code_values is not None:
                values, p = synth.code_values
                keep = ~pd.Series(values).astype(str).isin(flags).to_numpy()
                if keep.any():
                    given = ctx.loc[idx[bad], cols].reset_index(drop=True)
                    given[synth.code] = rng.choice(values[keep], size=bad.size, p=p[keep] / p[keep].sum())
                    again = synth.sample_given(given)[got.columns]
                    again.index = got.index[bad]
                    got.loc[again.index, again.columns] = again
            stats[f"{name}_flagged_code_redrawn"] = int(bad.size)
        parts.append(got)
        owners.append(idx)
    if not parts:
        return pd.DataFrame(columns=[KEY, *cl.columns])
    out = pd.concat(parts, ignore_index=True)
    own = np.concatenate(owners)
    if ENC_CLASS in out.columns and encounters is not None and synth.code:
        out = redraw_absent_classes(synth, out, own, root, ctx, cols, encounters, stats, name)
    out.insert(0, KEY, root[KEY].to_numpy()[own])
    out = _destandardise(out, cl)
    return out[[KEY, *cl.columns] + ([ENC_CLASS] if ENC_CLASS in out.columns else [])]


def _child_rows_par(model: RelationalModel, name: str, root: pd.DataFrame, ctx: pd.DataFrame,
                    stats: dict) -> pd.DataFrame:
    synth = model.children[name]
    counts = root[count_column(name)].clip(lower=0).astype(int)
    parts = []
    c = ctx.copy()
    for col, (seen, mode) in model.context_values.get(name, {}).items():  # PAR cannot take unseen contexts
        unseen = ~c[col].isin(seen)
        stats[f"{name}_unseen_context_replaced"] = stats.get(f"{name}_unseen_context_replaced", 0) + int(unseen.sum())
        c.loc[unseen, col] = mode
    c[KEY] = root[KEY].values
    for length, idx in c.groupby(counts.values).groups.items():
        if length <= 0:
            continue
        sub = c.loc[idx]
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            got = synth.sample_sequential_columns(sub.reset_index(drop=True), sequence_length=int(length))
        got = got if isinstance(got, pd.DataFrame) else next(iter(got.values()))
        parts.append(got)
    if not parts:
        return pd.DataFrame(columns=[KEY])
    return pd.concat(parts, ignore_index=True)


def _link_encounters(df: pd.DataFrame, cl: ChildLayout, enc: pd.DataFrame, rng: np.random.Generator,
                     stats: dict) -> pd.DataFrame:
    df = df.copy()
    df[ENC_KEY] = None
    if enc is None or enc.empty or not cl.link_rate or not cl.time or df.empty:
        return df
    if ENC_CLASS in df.columns and "class_code" in enc.columns:
        return link_by_class(df, cl, enc, stats)
    e = enc[[KEY, ENC_KEY, "start"]].dropna(subset=["start"]).sort_values("start", kind="stable")
    d = df[[KEY, cl.time]].reset_index().dropna(subset=[cl.time]).sort_values(cl.time, kind="stable")
    if d.empty or e.empty:
        return df
    m = pd.merge_asof(d, e.rename(columns={"start": "__enc_start"}), left_on=cl.time, right_on="__enc_start",
                      by=KEY, direction="nearest")
    m = m.dropna(subset=[ENC_KEY])
    if LINKED in df.columns:  # the model's own decision per row
        link = np.array([v is True or v == 1 for v in df.loc[m["index"].values, LINKED]], dtype=bool)
    else:
        link = rng.random(len(m)) < cl.link_rate
    m = m[link]
    df.loc[m["index"].values, ENC_KEY] = m[ENC_KEY].values
    if getattr(cl, "timing", None):  # placed inside the encounter as the real rows are (place_in_encounters)
        stats[f"{cl.name}_linked_to_encounter"] = int(len(m))
        return df
    if cl.snap_rate >= 0.5:
        df.loc[m["index"].values, cl.time] = m["__enc_start"].values
        stats[f"{cl.name}_snapped_to_encounter"] = int(len(m))
    stats[f"{cl.name}_linked_to_encounter"] = int(len(m))
    return df


def _postfix_times(df: pd.DataFrame, cl: ChildLayout, birth: pd.Series, death: pd.Series, ref: pd.Timestamp,
                   stats: dict) -> pd.DataFrame:
    """Cross-table constraints the models cannot see: birth <= event <= death (and <= the reference date)."""
    if not cl.time or df.empty:
        return df
    t = df[cl.time]
    b = df[KEY].map(birth)
    dd = df[KEY].map(death)
    ref_naive = ref.tz_convert(None) if ref.tzinfo else ref
    early = t.notna() & b.notna() & (t < b)
    late = t.notna() & dd.notna() & (t > dd + pd.Timedelta(days=1))
    future = t.notna() & (t > ref_naive)
    new_t = t.where(~early, b).where(~late, dd).where(~future, ref_naive)
    shift = (new_t - t).fillna(pd.Timedelta(0))
    df[cl.time] = new_t
    for c in cl.later_times:  # keep the later times' distance to the event (start <= end stays true)
        df[c] = df[c] + shift
        bad = df[c].notna() & (df[c] < df[cl.time])
        df.loc[bad, c] = df.loc[bad, cl.time]
    stats[f"{cl.name}_before_birth_fixed"] = int(early.sum())
    stats[f"{cl.name}_after_death_fixed"] = int(late.sum())
    stats[f"{cl.name}_after_reference_fixed"] = int(future.sum())
    return df


def _concepts_out(df: pd.DataFrame, cl: ChildLayout, rng: np.random.Generator, stats: dict) -> pd.DataFrame:
    """Concept tokens back to real (code, system, display, unit) units; coded values only where their code has
    them in the real data (drawn from that code's real values when the model paired them otherwise)."""
    for code, c in cl.concepts.items():
        if code not in df:
            continue
        tok = df[code].astype(object)
        known = tok.map(lambda t: isinstance(t, str) and t in c["map"])
        stats[f"{cl.name}_unknown_concept_cleared"] = stats.get(f"{cl.name}_unknown_concept_cleared", 0) + \
            int((tok.notna() & ~known).sum())
        for col in [code, *c["columns"]]:
            df[col] = tok.map(lambda t, col=col: c["map"][t][col] if isinstance(t, str) and t in c["map"] else None)
    if "value_code" in df and "code" in df:
        codes = df["code"].astype(object)
        vc = df["value_code"].astype(object)
        allowed = cl.value_codes
        ok = [isinstance(v, str) and isinstance(k, str) and v in allowed.get(k, ()) for k, v in zip(codes, vc)]
        ok = pd.Series(ok, index=df.index)
        needs = ~ok & codes.map(lambda k: isinstance(k, str) and k in allowed)
        was_set = vc.notna() & ~ok
        redraw = needs & vc.notna()
        if redraw.any():
            df.loc[redraw, "value_code"] = [allowed[k][rng.integers(len(allowed[k]))] for k in codes[redraw]]
        df.loc[was_set & ~redraw, "value_code"] = None
        stats[f"{cl.name}_value_code_fixed"] = stats.get(f"{cl.name}_value_code_fixed", 0) + int(was_set.sum())
    if "value_num" in df and "code" in df and "value_num" in cl.code_stats:
        numeric = set(cl.code_stats["value_num"])
        drop = df["code"].map(lambda k: k not in numeric) & df["value_num"].notna()
        df.loc[drop, "value_num"] = np.nan
        stats[f"{cl.name}_value_num_cleared"] = stats.get(f"{cl.name}_value_num_cleared", 0) + int(drop.sum())
    for col in cl.free_text:
        df[col] = None
    return df


def _finish_child(df: pd.DataFrame, cl: ChildLayout, start: int, rng: np.random.Generator | None = None,
                  stats: dict | None = None) -> pd.DataFrame:
    df = _concepts_out(df, cl, rng or np.random.default_rng(0), stats if stats is not None else {})
    for col, (src, mapping) in cl.derived.items():
        df[col] = df[src].map(mapping)
    for col, value in cl.constants.items():
        df[col] = value
    if cl.time and not df.empty:
        df = df.sort_values([KEY, cl.time], kind="stable").reset_index(drop=True)
    df[cl.key] = [f"syn-{ABBREV.get(cl.name, cl.name[:2])}{i:08d}" for i in range(start + 1, start + len(df) + 1)]
    for c in [cl.time, *cl.later_times]:
        if c and c in df:
            df[c] = pd.to_datetime(df[c]).dt.round("s").dt.tz_localize("UTC")
    for c in cl.all_columns:
        if c not in df:
            df[c] = None
    return df[cl.all_columns]


def _finish_root(root: pd.DataFrame, layout: Layout, stats: dict) -> pd.DataFrame:
    out = root.copy()
    if "deceased" in out and "deceased_date" in out:
        bad = ~out["deceased"].astype(bool) & out["deceased_date"].notna()
        out.loc[bad, "deceased_date"] = pd.NaT
        stats["patient_deceased_date_cleared"] = int(bad.sum())
    for c in ("birth_date", "deceased_date"):
        if c in out:
            out[c] = [d.date() if pd.notna(d) else None for d in pd.to_datetime(out[c])]
    for col, value in layout.root_constants.items():
        out[col] = value
    for c in layout.root_all_columns:
        if c not in out:
            out[c] = None
    return out[layout.root_all_columns]


def sample_batches(model: RelationalModel, patients: int, batch_size: int = 20_000, seed: int = 0,
                   root_sampler: Any = None) -> Iterator[tuple[dict[str, pd.DataFrame], dict]]:
    """Yield ``({table: DataFrame}, fix_counts)`` for batches of at most ``batch_size`` synthetic patients with
    all their child rows. Keys are fresh and unique across batches."""
    from synthfactory.synthesize.engine import sample_plain

    from synthfactory.synthesize.engine import reseed

    layout = model.layout
    rng = np.random.default_rng(seed)
    for k, child in enumerate(model.children.values()):
        if isinstance(child, CartChild):
            child.reseed(seed * 1000 + k + 1)
    if model.root is not None and isinstance(model.root, DatesAsDays):
        reseed(model.root, seed)
    if model.code_counts is not None:
        model.code_counts.reseed(seed * 1000 + 999)
    starts = {name: 0 for name in [ROOT, *layout.children]}
    done = 0
    while done < patients:
        n = min(batch_size, patients - done)
        stats: dict[str, int] = {}
        if model.engine == "hma":
            tables = _sample_hma(model, n)
            root = tables[ROOT]
        else:
            root = (root_sampler or sample_plain)(model.root, n) if root_sampler else sample_plain(model.root, n)
            root = root.reset_index(drop=True)
        root[KEY] = [f"syn-{ABBREV[ROOT]}{i:08d}" for i in range(starts[ROOT] + 1, starts[ROOT] + len(root) + 1)]
        if model.engine == "hma":
            # HMA's own keys -> ours
            keymap = dict(zip(tables[ROOT]["__hma_key"], root[KEY]))
            for name in layout.children:
                tables[name][KEY] = tables[name][KEY].map(keymap)
        ctx = context_frame(root, layout) if model.engine != "hma" else None
        if model.code_counts is not None:
            drawn = model.code_counts.sample_given(code_count_given(root, ctx, layout))
            for tname, cl in layout.children.items():
                if cl.count_codes:
                    cols = [*cl.count_codes, other_count_column(tname)]
                    for c in cols:
                        root[c] = drawn[c].clip(lower=0).astype("int64").to_numpy()
                    if getattr(cl, "total_from_root", False):  # the rest takes what the counted codes leave
                        counted = root[list(cl.count_codes)].sum(axis=1).to_numpy()
                        total = root[count_column(tname)].clip(lower=0).astype("int64").to_numpy()
                        root[other_count_column(tname)] = np.maximum(total - counted, 0)
                    root[count_column(tname)] = root[cols].sum(axis=1).astype("int64")
        birth = pd.Series(pd.to_datetime(root["birth_date"]).values, index=root[KEY]) if "birth_date" in root \
            else pd.Series(dtype="datetime64[ns]")
        death = pd.Series(pd.to_datetime(root["deceased_date"]).values, index=root[KEY]) \
            if "deceased_date" in root else pd.Series(dtype="datetime64[ns]")
        out: dict[str, pd.DataFrame] = {}
        for name in layout.order:
            cl = layout.children[name]
            if model.engine == "hma":
                df = tables[name][[KEY, *cl.columns]].copy()
            elif model.engine == "par":
                df = _child_rows_par(model, name, root, ctx, stats)
            elif isinstance(model.children[name], CartChild):
                df = _child_rows_cart(model, name, root, ctx, stats, rng, out.get(ENCOUNTER))
            else:
                df = _child_rows_pc(model, name, root, ctx, stats)
            if name == ENCOUNTER and (getattr(cl, "timing", None) or {}).get("gaps"):
                df = space_encounters(df, cl, birth, death, layout.reference, rng, stats)
            df = _postfix_times(df, cl, birth, death, layout.reference, stats)
            if name != ENCOUNTER and cl.link_rate:
                enc = out.get(ENCOUNTER)
                enc_naive = None
                if enc is not None:
                    enc_naive = enc[[KEY, ENC_KEY, "start"] + [c for c in ("end", "class_code") if c in enc]].copy()
                    for c in ("start", "end"):
                        if c in enc_naive:
                            enc_naive[c] = _naive_utc(enc_naive[c])
                df = _link_encounters(df, cl, enc_naive, rng, stats)
                if enc_naive is not None and "end" in enc_naive:  # a stay as the extract sees it: until the
                    # reference date (rows after it are not in an extract)
                    ref_naive = layout.reference.tz_convert(None) if layout.reference.tzinfo else layout.reference
                    enc_naive["end"] = enc_naive["end"].where(enc_naive["end"].isna() | (enc_naive["end"] <= ref_naive),
                                                              max(ref_naive, pd.Timestamp(0)))
                    enc_naive["end"] = enc_naive[["start", "end"]].max(axis=1).where(enc_naive["end"].notna())
                df = place_in_encounters(df, cl, enc_naive, rng, stats)
                if getattr(cl, "timing", None):  # a row placed in a stay that runs past a death or the reference
                    again: dict[str, int] = {}
                    df = _postfix_times(df, cl, birth, death, layout.reference, again)
                    for k, v in again.items():
                        stats[f"{k}_after_placement"] = stats.get(f"{k}_after_placement", 0) + int(v)
            out[name] = _finish_child(df, cl, starts[name], rng, stats)
            starts[name] += len(out[name])
        out[ROOT] = _finish_root(root, layout, stats)
        starts[ROOT] += len(root)
        done += n
        if patients > batch_size:
            log.info("relational sample progress patients=%d/%d", done, patients)
        yield {ROOT: out[ROOT], **{k: out[k] for k in layout.children}}, stats


def _sample_hma(model: RelationalModel, n: int) -> dict[str, pd.DataFrame]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = model.hma.sample(num_rows=n, main_table_name=ROOT)
    root = tables[ROOT].reset_index(drop=True)
    root["__hma_key"] = root[KEY]
    return {**tables, ROOT: root}


def sample(model: RelationalModel, patients: int, batch_size: int = 20_000, seed: int = 0,
           root_sampler: Any = None) -> tuple[dict[str, pd.DataFrame], dict]:
    """All batches concatenated in memory (tests, small outputs); the pipeline streams :func:`sample_batches`."""
    parts: dict[str, list[pd.DataFrame]] = {}
    totals: dict[str, int] = {}
    for tables, stats in sample_batches(model, patients, batch_size, seed, root_sampler):
        for k, v in tables.items():
            parts.setdefault(k, []).append(v)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + int(v)
    return {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}, totals


# -- measurements ---------------------------------------------------------------------------------
def real_statistics(tables: dict[str, pd.DataFrame], layout: Layout) -> dict:
    """Children-per-parent quantiles of the real tables (aggregates only: small-cell-safe summary)."""
    n = len(tables[ROOT])
    out = {}
    for name in layout.children:
        c = tables[name].groupby(KEY).size().reindex(tables[ROOT][KEY], fill_value=0)
        out[name] = {"mean_per_patient": round(float(c.mean()), 4), "share_with_none": round(float((c == 0).mean()), 4)}
    out["patients"] = n
    return out


def referential_integrity(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Share of child rows whose ``patient_key`` (and ``encounter_key`` when set) exists in the parent table."""
    pk = set(tables[ROOT][KEY])
    enc = tables.get(ENCOUNTER)
    ek_owner = dict(zip(enc[ENC_KEY], enc[KEY])) if enc is not None and len(enc) else {}
    out = {}
    for name, df in tables.items():
        if name == ROOT or KEY not in df:
            continue
        ok = df[KEY].isin(pk)
        out[f"{name}.patient_key"] = round(float(ok.mean()) if len(df) else 1.0, 6)
        if ENC_KEY in df and name != ENCOUNTER:
            linked = df[ENC_KEY].notna()
            same = df.loc[linked, ENC_KEY].map(ek_owner) == df.loc[linked, KEY]
            out[f"{name}.encounter_key"] = round(float(same.mean()) if linked.any() else 1.0, 6)
    return out


def children_ks(real: dict[str, pd.DataFrame], synthetic: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """KS statistic of the children-per-parent distribution, per child table (0 = identical)."""
    from scipy.stats import ks_2samp

    out = {}
    for name in real:
        if name == ROOT or name not in synthetic or KEY not in real[name]:
            continue
        r = real[name].groupby(KEY).size().reindex(real[ROOT][KEY], fill_value=0)
        s = synthetic[name].groupby(KEY).size().reindex(synthetic[ROOT][KEY], fill_value=0)
        out[name] = {"ks": round(float(ks_2samp(r.values, s.values).statistic), 4),
                     "real_mean": round(float(r.mean()), 3), "synthetic_mean": round(float(s.mean()), 3)}
    return out


def constraint_violations(tables: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Rows breaking birth <= event, encounter start <= end, birth <= death (0 expected after the fixes)."""
    p = tables[ROOT]
    birth = pd.Series(_naive_utc(pd.Series(p["birth_date"])).values, index=p[KEY])
    out = {}
    if "deceased_date" in p:
        d = _naive_utc(pd.Series(p["deceased_date"]))
        out["patient.death_before_birth"] = int((d.notna() & (d.values < birth.values)).sum())
    enc = tables.get(ENCOUNTER)
    if enc is not None and {"start", "end"} <= set(enc.columns):
        out["encounter.end_before_start"] = int((enc["end"].notna() & (enc["end"] < enc["start"])).sum())
    for name, df in tables.items():
        if name == ROOT:
            continue
        t = next((c for c in TIME_PREFERENCE if c in df), None)
        if t:
            tt = _naive_utc(df[t])
            b = df[KEY].map(birth)
            out[f"{name}.{t}_before_birth"] = int((tt.notna() & b.notna() & (tt < b)).sum())
    return out


def unseen_concepts(real: dict[str, pd.DataFrame], synthetic: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """Per table and code column: synthetic rows whose (code, system, display, unit) combination never occurs in
    the real table (0 expected: a concept is sampled as one unit)."""
    out = {}
    for name, syn in synthetic.items():
        if name == ROOT or name not in real:
            continue
        for code, comp in concept_groups(list(real[name].columns)).items():
            cols = [code, *comp]
            if not set(cols) <= set(syn.columns) or syn.empty:
                continue

            def combos(df: pd.DataFrame) -> pd.Series:
                return pd.Series(list(zip(*[df[c].astype(object).where(df[c].notna(), None) for c in cols])),
                                 index=df.index)
            seen = set(combos(real[name]))
            s = combos(syn[syn[code].notna() | syn[comp].notna().any(axis=1)])
            bad = int((~s.isin(seen)).sum()) if len(s) else 0
            out[f"{name}.{code}"] = {"rows": int(len(s)), "unseen": bad}
    return out
