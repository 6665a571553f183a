"""Source-agnostic features: conditions by concept (codes in several systems), labs by concept (LOINC
synonyms), discovery of features (``features.auto``), and the columns a spec names elsewhere.

:func:`synthfactory.synthesize.modelling.build_modelling_table` builds the table with these helpers;
:func:`synthfactory.synthesize.modelling.check_features` refuses, before fit, a spec whose features or
referenced columns the extract cannot produce, with :func:`extract_summary` (what the extract does have).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd

from synthfactory.spec import BASE_FEATURE_COLUMNS, ConditionConcept, LabFeature, code_system_key

if TYPE_CHECKING:
    from synthfactory.spec import DatasetSpec

KEY = "patient_key"

#: Lab concepts and their LOINC synonyms, all reported in the same unit (values are pooled unconverted).
#: ``features.auto`` names a discovered lab after its concept here, else after its LOINC display.
LAB_CONCEPTS: dict[str, tuple[str, ...]] = {
    "hba1c": ("4548-4", "17856-6", "4549-2"),                        # %
    "bmi": ("39156-5",),                                             # kg/m2
    "systolic_bp": ("8480-6",),                                      # mm[Hg]
    "diastolic_bp": ("8462-4",),                                     # mm[Hg]
    "heart_rate": ("8867-4",),
    "respiratory_rate": ("9279-1",),
    "body_temperature": ("8310-5",),                                 # Cel
    "body_weight": ("29463-7",),                                     # kg
    "body_height": ("8302-2",),                                      # cm
    "oxygen_saturation": ("59408-5", "2708-6"),                      # %
    "ldl": ("13457-7", "18262-6", "2089-1"),                         # mg/dL: calculated, direct
    "hdl": ("2085-9",),
    "total_cholesterol": ("2093-3",),
    "triglycerides": ("2571-8",),
    # eGFR in mL/min/{1.73_m2}: CKD-EPI 2021, MDRD (non-black / black / any), CKD-EPI (any / black / non-black)
    "egfr": ("98979-8", "48642-3", "48643-1", "33914-3", "62238-1", "88293-6", "88294-4", "69405-9"),
    "glucose": ("2345-7", "2339-0"),                                 # mg/dL, serum/plasma and blood
    "creatinine": ("2160-0", "38483-4"),                             # mg/dL
    "potassium": ("2823-3", "6298-4"),
    "sodium": ("2951-2", "2947-0"),
    "hemoglobin": ("718-7",),
    "alt": ("1742-6",),
    "ast": ("1920-8",),
}
_LOINC_TO_CONCEPT = {code: name for name, codes in LAB_CONCEPTS.items() for code in codes}
LOINC_SYSTEMS = {"loinc"}


# -- codes ----------------------------------------------------------------------------------------
def _norm(system: str, code: str) -> str:
    c = str(code).strip()
    return c.upper().replace(".", "") if system == "icd10cm" else c


def _systems(df: pd.DataFrame) -> pd.Series:
    if "code_system" not in df:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    uniq = {s: code_system_key(s) for s in df["code_system"].dropna().unique()}
    return df["code_system"].map(uniq)


def concept_mask(cond: pd.DataFrame, concept: ConditionConcept, systems: pd.Series | None = None) -> pd.Series:
    """Rows of the condition table coded with one of the concept's codes (a table without ``code_system``
    matches the codes of every system)."""
    systems = _systems(cond) if systems is None else systems
    codes = cond["code"].astype(str)
    mask = pd.Series(False, index=cond.index)
    for system, patterns in concept.codes.items():
        in_system = systems.eq(system) | systems.isna()
        if not in_system.any():
            continue
        normed = codes[in_system].map(lambda c, s=system: _norm(s, c))
        exact = {_norm(system, p) for p in patterns if not p.endswith("*")}
        prefixes = tuple(_norm(system, p[:-1]) for p in patterns if p.endswith("*"))
        hit = normed.isin(exact)
        if prefixes:
            hit |= normed.str.startswith(prefixes)
        mask.loc[hit[hit].index] = True
    return mask


def describe_codes(concept: ConditionConcept) -> str:
    return "; ".join(f"{system} {', '.join(codes)}" for system, codes in concept.codes.items())


def lab_rows(obs: pd.DataFrame, lab: LabFeature, systems: pd.Series | None = None) -> pd.DataFrame:
    """Numeric observations of any of the lab's LOINC codes (rows whose system is LOINC, or unknown)."""
    systems = _systems(obs) if systems is None else systems
    ok = obs["code"].isin(lab.loinc) & obs["value_num"].notna() & (systems.isin(LOINC_SYSTEMS) | systems.isna())
    return obs[ok]


# -- discovery (features.auto) --------------------------------------------------------------------
def slug(text: str, limit: int = 40) -> str:
    """A readable lower_snake_case name: ``Essential (primary) hypertension`` -> ``essential_primary_hypertension``."""
    s = re.sub(r"[^a-z0-9]+", "_", str(text).split("[")[0].lower()).strip("_")
    if len(s) > limit:
        s = s[:limit].rsplit("_", 1)[0] if "_" in s[:limit] else s[:limit]
    if s and not s[0].isalpha():
        s = "x" + s
    return s


def _unique(name: str, taken: set[str], suffix: str) -> str:
    if name and name not in taken:
        return name
    alt = f"{name}_{slug(suffix, 20)}" if name else slug(suffix, 20)
    i = 2
    while alt in taken:
        alt, i = f"{alt}_{i}", i + 1
    return alt


def condition_prevalence(cond: pd.DataFrame) -> pd.DataFrame:
    """Patients per (code_system, code), most prevalent first, with a display text."""
    if cond is None or cond.empty:
        return pd.DataFrame(columns=["code_system", "code", "display", "patients"])
    df = cond[cond["code"].notna()].assign(code_system=_systems(cond).fillna(""))
    if "display" not in df:
        df = df.assign(display=None)
    g = df.groupby(["code_system", "code"], sort=False)
    out = pd.DataFrame({"patients": g[KEY].nunique(), "display": g["display"].first()}).reset_index()
    return out.sort_values(["patients", "code_system", "code"], ascending=[False, True, True],
                           kind="stable").reset_index(drop=True)


def lab_prevalence(obs: pd.DataFrame) -> pd.DataFrame:
    """Patients with numeric values per (code_system, code), most measured first, with display and units."""
    cols = ["code_system", "code", "display", "unit", "patients"]
    if obs is None or obs.empty:
        return pd.DataFrame(columns=cols)
    df = obs[obs["value_num"].notna() & obs["code"].notna()]
    df = df.assign(code_system=_systems(df).fillna(""))
    for c in ("display", "unit"):
        if c not in df:
            df = df.assign(**{c: None})
    g = df.groupby(["code_system", "code"], sort=False)
    out = pd.DataFrame({"patients": g[KEY].nunique(), "display": g["display"].first(),
                        "unit": g["unit"].agg(lambda u: ", ".join(sorted(set(u.dropna().astype(str)))))})
    return out.reset_index().sort_values(["patients", "code"], ascending=[False, True],
                                         kind="stable").reset_index(drop=True)[cols]


def discover_conditions(prevalence: pd.DataFrame, n: int, taken: set[str]) -> list[ConditionConcept]:
    """The n most prevalent codes as single-code concepts with readable names (cond_<display>)."""
    out = []
    for row in prevalence.head(n).itertuples():
        system = row.code_system or "icd10cm"
        name = _unique(slug(row.display or row.code), {t[len("cond_"):] for t in taken if t.startswith("cond_")},
                       row.code)
        concept = ConditionConcept(name=name, codes={system: [str(row.code)]},
                                   description=str(row.display or ""))
        taken.add(concept.column)
        out.append(concept)
    return out


def discover_labs(obs: pd.DataFrame | None, n_patients: int, min_share: float, limit: int,
                  named: Iterable[LabFeature], taken: set[str]) -> list[LabFeature]:
    """Numeric LOINC labs measured in at least ``min_share`` of the patients, known synonyms pooled under
    their concept name (LAB_CONCEPTS), others named after their display; labs the spec names are skipped."""
    if obs is None or obs.empty or limit == 0:
        return []
    known = {code for lab in named for code in lab.loinc}
    prev = lab_prevalence(obs)
    prev = prev[prev["code_system"].isin(LOINC_SYSTEMS) & ~prev["code"].isin(known)]
    groups: dict[str, dict[str, Any]] = {}
    for row in prev.itertuples():
        concept = _LOINC_TO_CONCEPT.get(row.code)
        gkey = concept or row.code
        g = groups.setdefault(gkey, {"codes": [], "display": row.display, "concept": concept})
        g["codes"].append(row.code)
    systems = _systems(obs)
    scored = []
    for gkey, g in groups.items():
        probe = LabFeature.model_construct(name="probe", loinc=g["codes"], agg="last")
        n = lab_rows(obs, probe, systems)[KEY].nunique()
        if n >= min_share * n_patients:
            scored.append((n, gkey, g))
    scored.sort(key=lambda t: (-t[0], t[2]["concept"] is None, t[1]))  # ties: known concepts first
    out = []
    for n, gkey, g in scored[:limit]:
        base = g["concept"] or slug(g["display"] or "lab_" + gkey)
        if not base or base in BASE_FEATURE_COLUMNS or base.startswith("cond_") or len(base) < 2:
            base = "lab_" + base
        name = _unique(base, taken, "loinc_" + g["codes"][0])
        taken.add(name)
        out.append(LabFeature(name=name, loinc=g["codes"]))
    return out


# -- what the extract has, what the spec names ----------------------------------------------------
def lab_synonyms_present(obs: pd.DataFrame | None, lab: LabFeature) -> list[str]:
    """Codes of the lab's concept (LAB_CONCEPTS) that the extract has although the lab does not list them,
    as ``loinc <code> '<display>' (<n> patients)``: the hint for a lab without values."""
    concepts = {_LOINC_TO_CONCEPT[c] for c in lab.loinc if c in _LOINC_TO_CONCEPT}
    wanted = {code for c in concepts for code in LAB_CONCEPTS[c]} - set(lab.loinc)
    if not wanted or obs is None or obs.empty:
        return []
    prev = lab_prevalence(obs[obs["code"].isin(wanted)])
    return [f"loinc {r.code} {str(r.display or '')[:60]!r} ({int(r.patients)} patients)" for r in prev.itertuples()
            if r.code_system in LOINC_SYSTEMS]


def extract_summary(tables: dict[str, pd.DataFrame], top: int = 20) -> dict:
    """The extract's most prevalent condition codes and most measured numeric labs, with patient counts."""
    pats = tables.get("patient")
    cond = condition_prevalence(tables.get("condition"))
    labs = lab_prevalence(tables.get("observation"))
    return {
        "patients": int(pats[KEY].nunique()) if pats is not None and KEY in pats else 0,
        "condition_codes": int(len(cond)),
        "conditions": [{"system": r.code_system, "code": r.code, "display": r.display, "patients": int(r.patients)}
                       for r in cond.head(top).itertuples()],
        "lab_codes": int(len(labs)),
        "labs": [{"system": r.code_system, "code": r.code, "display": r.display, "unit": r.unit,
                  "patients": int(r.patients)} for r in labs.head(top).itertuples()],
    }


def format_summary(summary: dict, columns: Iterable[str] = ()) -> str:
    """The summary as text for an error message or the CLI."""
    def disp(d: Any) -> str:
        return f" {str(d)[:60]!r}" if d else ""

    lines = [f"the extract has {summary['patients']} patients"]
    cols = [c for c in columns if c != KEY]
    if cols:
        lines.append(f"modelling-table columns: {', '.join(cols)}")
    lines.append(f"conditions (top {len(summary['conditions'])} of {summary['condition_codes']} codes, patients):")
    lines += [f"  {c['system'] or '?'} {c['code']}{disp(c['display'])}: {c['patients']}" for c in summary["conditions"]]
    lines.append(f"numeric labs (top {len(summary['labs'])} of {summary['lab_codes']} codes, patients):")
    lines += [f"  {x['system'] or '?'} {x['code']}{disp(x['display'])} [{x['unit'] or '-'}]: {x['patients']}"
              for x in summary["labs"]]
    return "\n".join(lines)


def referenced_columns(spec: "DatasetSpec") -> list[tuple[str, str]]:
    """(where, column) for every modelling-table column the spec names outside ``features``: privacy
    quasi-identifiers and sensitive attributes, relationship measure/by, the utility target and features
    (the spec's own thresholds and every profile's), and the synthesizer's rebalance/oversample column and
    patient-table constraints."""
    out: list[tuple[str, str]] = []
    default: set[tuple[str, str]] = set()
    for profile in spec.profile_names:  # a profile's reference is listed only where it differs from the spec's
        q, p = spec.thresholds(profile)
        refs = [("privacy.quasi_identifiers", c) for c in p.quasi_identifiers]
        refs += [("privacy.sensitive_attributes", c) for c in p.sensitive_attributes]
        for r in q.relationships:
            refs += [(f"quality.relationships.{r.name}.measure", r.measure),
                     (f"quality.relationships.{r.name}.by", r.by)]
        if q.utility is not None:
            refs.append(("quality.utility.target", q.utility.target))
            refs += [("quality.utility.features", c) for c in q.utility.features]
        if profile == "default":
            default = set(refs)
            out += refs
        else:
            out += [(f"profiles.{profile}.{w}", c) for w, c in refs if (w, c) not in default]
    syn = spec.synthesizer
    if syn.mode == "patient_table":
        for label, sel in (("rebalance", syn.rebalance), ("oversample", syn.oversample)):
            if sel is not None:
                out.append((f"synthesizer.{label}.column", sel.column))
        for i, c in enumerate(syn.constraints):
            if c.table == "patients":
                cols = [*(x for x in (c.low, c.middle, c.high, c.column) if x), *c.columns]
                out += [(f"synthesizer.constraints.{i}", x) for x in cols]
    return list(dict.fromkeys(out))


def unresolvable_columns(spec: "DatasetSpec") -> list[tuple[str, str]]:
    """Referenced columns that no feature of the spec can produce, whatever the extract (static check). A
    ``cond_<code>`` name may be a top_conditions flag, but condition codes have digits and no word in them
    (ICD-10-CM E11.9 -> cond_e11_9, SNOMED CT 44054006): any other ``cond_`` name can only be a concept's
    column. With features.auto any name may be a discovered lab or condition."""
    f = spec.features
    if f.auto:
        return []
    known = set(BASE_FEATURE_COLUMNS) | f.columns()

    def possible(c: str) -> bool:
        return c in known or (c.startswith("cond_") and f.top_conditions > 0 and _code_like(c[len("cond_"):]))

    return [(w, c) for w, c in referenced_columns(spec) if not possible(c)]


def _code_like(name: str) -> bool:
    """Could ``name`` be a condition code in column form (a digit, and no run of three letters: e11_9, 44054006,
    s72_001a), rather than a word (t2_diabetes)?"""
    return any(ch.isdigit() for ch in name) and re.search(r"[a-z]{3}", name) is None


def column_problems(spec: "DatasetSpec") -> list[str]:
    """:func:`unresolvable_columns` as messages naming the field, the column and the closest known column."""
    import difflib

    f = spec.features
    known = sorted(set(BASE_FEATURE_COLUMNS) | f.columns())
    out = []
    for where, col in unresolvable_columns(spec):
        close = difflib.get_close_matches(col, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        what = ("a concept in features.conditions (cond_<name>), or a condition code in features.condition_codes"
                if col.startswith("cond_") else "a lab in features.labs, a condition column (cond_...) or one of "
                f"{', '.join(BASE_FEATURE_COLUMNS)}")
        out.append(f"{where}: {col!r} is not a column the features can produce (it needs {what}){hint}")
    return out
