"""What the data card says in words: the meaning of each privacy figure, the data dictionary, and failed
expectations in plain language. Pure functions over the stage summaries; no Airflow, no plotting.

Privacy figures are rendered generically from the privacy stage summary (:func:`privacy_rows`): every
scalar figure, nested figures as ``parent.child``, each with its interval where the summary gives one
(``<figure>_ci``, ``<figure>_interval``, ``<figure>_se`` or ``ci_low``/``ci_high``), what real data itself
scores on it (``reference``), the gate's result on it, and a one-line meaning from :data:`PRIVACY_MEANINGS`
(exact name, then the last name segment, then :data:`PRIVACY_PATTERNS`). A new figure needs only a table
entry; one without shows "no description" and the card test refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PRIVACY_MEANINGS", "PRIVACY_PATTERNS", "NO_MEANING", "privacy_rows", "k_anonymity_note",
           "data_dictionary", "expectation_rows", "meaning_of"]

NO_MEANING = "no description (add it to synthfactory.quality.cardtext.PRIVACY_MEANINGS)"

#: one line per privacy figure, keyed by the figure's name in the privacy stage summary
PRIVACY_MEANINGS: dict[str, str] = {
    "exact_match_rate": "Share of synthetic rows identical to a real training row (0 = nothing copied verbatim).",
    "dcr_share": "Share of synthetic rows closer to a training row than to an unseen (holdout) real row, adjusted "
                 "for their sizes: 0.5 = no closer to the training patients than to unseen ones; 1.0 = memorised; "
                 "far below 0.5 = closer to the holdout (real rows the model never saw leaked).",
    "dcr_share_subsample": "The same share on equal-size samples without the size adjustment (at a 20 % holdout "
                           "a pure copier scores only about 0.63 on it).",
    "dcr_ratio": "Median distance of synthetic rows to their closest training row, over the same for unseen real "
                 "rows (1 = as far as a new patient; far below 1 = copies or near-copies).",
    "leak_clean": "The leak scan found no real identifier (ids, names, addresses, phone numbers, hashed keys) in "
                  "any released file, this card included.",
    "leak_hits": "Occurrences of real identifiers the leak scan found in the released files (0 = clean).",
    "mia_auc": "Membership inference: how well an attacker tells training patients from unseen real patients by "
               "their distance to the closest synthetic row (ROC AUC: 0.5 = chance, 1 = always right).",
    "nndr_synth_median": "Median nearest-neighbour distance ratio of synthetic rows to the training rows "
                         "(closest / second closest; near 0 = a synthetic row sits on one real patient).",
    "nndr_holdout_median": "The same ratio for unseen real rows: what a new real patient scores (compare with "
                           "the synthetic median).",
    "rare_combination_share": "Share of synthetic rows whose quasi-identifier combination is rare among real "
                              "patients (shared by fewer than min_k_anonymity of them); descriptive, not gated.",
    "holdout_rare_combination_share": "The same share among unseen real rows: what real data itself shows.",
    "k_anonymity": "Fewest synthetic rows that share one quasi-identifier combination (k-anonymity of the "
                   "synthetic table; synthetic rows are not people, so a small k alone identifies no one).",
    "rare_record_mia_auc": "Membership inference on the rare, most exposed real patients only: AUC of rare "
                           "training patients vs rare unseen ones by distance to the closest synthetic row "
                           "(0.5 = chance).",
    "rare_record_mia_status": "Whether the rare-record test ran (measured) or had too few rare patients to test "
                              "(skipped).",
    "rare_record_mia_reason": "Why the rare-record test was skipped.",
    "rare_record_members": "Rare real patients in the training split the rare-record test attacked.",
    "rare_record_nonmembers": "Rare unseen real patients it compared them with.",
    "sdmetrics_dcr_baseline_protection": "SDMetrics' DCR baseline protection: distance of synthetic rows to real "
                                         "ones relative to random data (1 = as far as random rows, 0 = copies).",
    "anonymeter_certified": "Every anonymeter risk is certified: its upper 95 % bound is within the threshold "
                            "and enough attacks ran to trust it.",
    "anonymeter.singling_out": "Anonymeter singling-out risk: how often a rule learnt from the synthetic data "
                               "picks out exactly one real patient, beyond chance (0 = never).",
    "anonymeter.linkability": "Anonymeter linkability risk: how often the synthetic data links a real patient's "
                              "quasi-identifiers to the rest of their record, beyond chance.",
    "datacard_leak_scan_clean": "The leak scan of this card found no real identifier in it.",
    "mia_certified": "Every membership-inference attack's upper 95 % bounds are within the thresholds, with "
                     "enough targets to tell (false: the intervals are too wide to certify, which alone does not "
                     "refuse).",
    "shadow_models": "Shadow models of the spec's synthesizer the shadow attack trained (its cost).",
    "targets_per_side": "Most exposed training and unseen real records the shadow attack scored, each side.",
    "shadow_rows": "Rows of each shadow model's training set.",
    "bootstrap": "Bootstrap draws behind the attack's 95 % intervals.",
    "bandwidth": "Kernel bandwidth of the DOMIAS density estimates (in the encoded distance space).",
    "bandwidth_rule": "How that bandwidth was chosen (nn: median holdout-to-train nearest distance; scott: "
                      "Scott's rule).",
    "reference_population": "The real population DOMIAS compares the synthetic density with.",
    "fit_seconds": "Seconds spent training the shadow models.",
    "shadow_synthetic_rows": "Rows each shadow model sampled.",
    "shadow_validation_auc": "The shadow attack's AUC on shadow models it was not trained on: how well it works "
                             "where the truth is known (0.5 = it learnt nothing).",
    # relational mode: a patient's whole record is the unit (privacy.records, privacy.record_mia)
    "record.exact_match_rate": "Share of synthetic patient records (demographics, rows per table, frequent codes, "
                               "lab medians) identical to a real training patient's record (0 = no record copied).",
    "record.dcr_share": "Share of synthetic patient records closer to a training patient's record than to an unseen "
                        "one's (0.5 = no closer to the training patients; higher = near-copies).",
    "record.partial_exact_match_rate": "Share of training patients singled out by an attacker who knows their sex, "
                                       "birth year and a few of their events (codes with exact dates): exactly one "
                                       "synthetic record holds them all (0 = none singled out; reference: fresh real "
                                       "records, scaled to the release's size).",
    "record.partial_exact_match_rate_nonmembers": "The same share for unseen real patients (what coincidence "
                                                  "alone gives; not gated).",
    "record.mia.partial_distance.auc": "Record-level membership inference: an attacker who knows a patient's sex, "
                                       "birth year and a few of their events with approximate dates (± date_jitter_days) tells training "
                                       "patients from unseen ones by the closest synthetic record (ROC AUC: 0.5 = "
                                       "chance, 1 = always right).",
    "record.mia.partial_domias.auc": "Record-level membership inference, density variant (DOMIAS): the same "
                                     "partial knowledge, scored by how much denser the synthetic records are than "
                                     "unseen real records around it (0.5 = chance).",
    "record.known_events": "Events of each target patient the record-level attacker knows (codes with "
                           "approximate dates, besides sex and birth year).",
    "record.synthetic_records": "Synthetic patient records the record-level figures were measured on.",
    "record.partial_exact_match_targets": "Training patients (with at least one event) the partial exact-match "
                                          "attack targeted.",
    "record.date_jitter_days": "How precisely the record-level attacker knows each event's date (± days).",
    "record.resplits": "Re-splits of the real patients behind each record-level reference (fresh real records "
                       "playing the release).",
}

#: meanings of families of figures, by pattern on the figure's full (dotted) name
PRIVACY_PATTERNS: list[tuple[str, str]] = [
    (r"^anonymeter\.inference:(?P<attr>.+)$",
     "Anonymeter inference risk for {attr}: how often an attacker who knows a patient's quasi-identifiers "
     "guesses their {attr} from the synthetic data, beyond what unseen real data allows."),
    (r"(^|\.|_)tpr_at_fpr_?(?P<fpr>[0-9p.]+)(_ci)?$",
     "True-positive rate of the attack at a false-positive rate of {fpr}: share of training patients it "
     "catches while wrongly accusing only {fpr} of unseen ones ({fpr} = chance)."),
    (r"(^|\.)(?P<attack>[a-z0-9_]+)\.auc$",
     "{attack} membership-inference attack: ROC AUC of training patients vs unseen ones (0.5 = chance)."),
    (r"(^|\.|_)max(_mia)?_auc$",
     "The strongest membership-inference attack's AUC (the maximum over the attacks; 0.5 = chance)."),
    (r"(^|\.|_)auc$", "ROC AUC of a membership-inference attack: training patients vs unseen ones (0.5 = chance)."),
    (r"(^|\.)(n|n_members|n_nonmembers|members|nonmembers|targets)$",
     "Number of records the attack was run on."),
    (r"(^|\.)(status)$", "Whether the figure was measured or skipped."),
    (r"(^|\.)(reason)$", "Why the figure was not measured."),
    (r"(^|\.)(max_)?(?P<fig>[a-z0-9_]+?)_attack$",
     "The attack with the largest lower 95 % bound of {fig} (the one the gate judges)."),
]

_SKIP = {"report_uri", "seconds", "message", "extra_checks", "reference", "gate_rules", "ci_low", "ci_high",
         "error"}


def meaning_of(name: str) -> str:
    """The one-line meaning of a privacy figure (full dotted name, else its last segment, else a pattern)."""
    if name in PRIVACY_MEANINGS:
        return PRIVACY_MEANINGS[name]
    last = name.rsplit(".", 1)[-1]
    if last in PRIVACY_MEANINGS:
        return PRIVACY_MEANINGS[last]
    for pattern, text in PRIVACY_PATTERNS:
        mo = re.search(pattern, name)
        if mo:
            groups = {k: v or "" for k, v in mo.groupdict().items()}
            if "fpr" in groups:
                groups["fpr"] = _fpr_text(groups["fpr"].replace("p", "."))
            return text.format(**groups)
    return NO_MEANING


def _fpr_text(raw: str) -> str:
    try:
        x = float(raw)
    except ValueError:
        return raw
    if x >= 1:  # given in percent (tpr_at_fpr_1 = 1 %)
        return f"{x:g} %"
    return f"{x * 100:g} %"


def _is_figure(v: Any) -> bool:
    return isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) < 120) or v is None


def _interval(d: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    for k in (f"{key}_ci", f"{key}_interval"):
        v = d.get(k)
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            return float(v[0]), float(v[1])
    lo, hi = d.get(f"{key}_ci_low"), d.get(f"{key}_ci_high")  # the battery's maxima
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return float(lo), float(hi)
    stem = key[:-4] if key.endswith("_auc") else key
    se = d.get(f"{key}_se", d.get(f"{stem}_se"))
    val = d.get(key)
    if isinstance(se, (int, float)) and isinstance(val, (int, float)) and not isinstance(val, bool):
        return float(val) - 1.96 * float(se), float(val) + 1.96 * float(se)
    return None


#: summary figure -> the gate check's name where they differ
CHECK_ALIASES = {"leak_clean": "leak_scan_clean"}


def _checks_for(name: str, checks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    name = CHECK_ALIASES.get(name, name)
    return [c for c in checks if c.get("gate") == "privacy" and (
        c.get("name") == name or str(c.get("name", "")).startswith(name + "."))]


def _status(checks: list[Mapping[str, Any]]) -> str:
    if not checks:
        return "not gated"
    results = [c.get("result") or ("pass" if c.get("passed") else "FAIL") for c in checks]
    if any(c.get("certified") is False and c.get("passed") for c in checks):
        results.append("not certified")
    if "FAIL" in results:
        return "FAIL"
    if "not certified" in results:
        return "not certified"
    return "pass"


def privacy_rows(summary: Mapping[str, Any] | None, checks: Sequence[Mapping[str, Any]] = (),
                 notes: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """One row per privacy figure of the stage summary: ``name``, ``value``, ``interval`` (low, high) or None,
    ``reference`` (mean, sd) or None, ``status`` (pass / FAIL / not certified / not gated), ``meaning`` and
    ``note`` (the gate's rule for an anonymeter risk). ``notes``: the privacy report's ``gate_rules.anonymeter``."""
    ps = dict(summary or {})
    ref = ps.get("reference") or {}
    notes = dict(notes or {})
    rows: list[dict] = []
    folded: set[str] = set()

    def add(name: str, value: Any, interval: tuple | None, reference: Any, extra_checks: list | None = None,
            note: str = "", n: Any = None) -> None:
        own = extra_checks if extra_checks is not None else _checks_for(name, checks)
        r = reference if isinstance(reference, Mapping) and reference.get("mean") is not None else None
        rows.append({"name": name, "value": value, "interval": interval, "reference": r, "status": _status(own),
                     "meaning": meaning_of(name), "note": note, "n": n,
                     "checks": [c.get("name") for c in own]})

    def walk(prefix: str, d: Mapping[str, Any], refs: Mapping[str, Any]) -> None:
        for key in d:
            if key.endswith(("_ci", "_interval")):
                folded.add(prefix + key)
        for key, v in d.items():
            name = prefix + key
            if key in _SKIP or key.endswith("_uri") or name in folded or key.endswith(("_ci", "_interval")):
                continue
            if key.endswith("_se") and (f"{key[:-3]}_auc" in d or key[:-3] in d):
                continue  # folded into its figure's interval
            if key.endswith(("_ci_low", "_ci_high", "_reference", "_resolved")) and \
                    key.rsplit("_", 2 if key.endswith(("_ci_low", "_ci_high")) else 1)[0] in d:
                continue  # folded into its figure's row (interval, reference, "not certified")
            if isinstance(v, Mapping):
                if "risk" in v or ("ci_low" in v and "ci_high" in v):  # a risk with its interval
                    value = v.get("risk", v.get("value"))
                    lo, hi = v.get("ci_low"), v.get("ci_high")
                    interval = (float(lo), float(hi)) if lo is not None and hi is not None else None
                    label = name.replace("anonymeter_risks.", "anonymeter.")
                    note = str((notes.get(key) or {}).get("note") or "")
                    add(label, value, interval, refs.get(key) if isinstance(refs, Mapping) else None,
                        extra_checks=_checks_for(label, checks), note=note, n=v.get("n"))
                else:
                    walk(name + ".", v, (refs.get(key) if isinstance(refs, Mapping) else None) or {})
                continue
            if isinstance(v, (list, tuple)) or not _is_figure(v):
                continue
            own_ref = d.get(f"{key}_reference")  # the battery carries each figure's real-data reference beside it
            add(name, v, _interval(d, key),
                own_ref if isinstance(own_ref, Mapping) else refs.get(key) if isinstance(refs, Mapping) else None)

    walk("", ps, ref)
    return rows


def k_anonymity_note(summary: Mapping[str, Any] | None, thresholds: Mapping[str, Any] | None,
                     checks: Sequence[Mapping[str, Any]] = (), approved: bool | None = None) -> str | None:
    """A sentence when the synthetic table's k-anonymity is below the spec's ``min_k_anonymity``: what that
    means, what the spec's k is for, and why the release was still approved (or was refused)."""
    ps, pt = dict(summary or {}), dict(thresholds or {})
    k, min_k = ps.get("k_anonymity"), pt.get("min_k_anonymity")
    if not isinstance(k, (int, float)) or not isinstance(min_k, (int, float)) or k >= min_k:
        return None
    qis = ", ".join(pt.get("quasi_identifiers") or []) or "the quasi-identifiers"
    rare = [c for c in checks if str(c.get("name", "")).startswith("rare_record_mia_auc")]
    status = ps.get("rare_record_mia_status")
    if rare:
        c = rare[0]
        test = (f"the rare-record membership test {'passed' if c.get('passed') else 'FAILED'} "
                f"(AUC lower bound {c.get('value')} vs {c.get('threshold')})")
    elif status == "skipped":
        test = "the rare-record membership test was skipped (too few rare patients to test)"
    else:
        test = "the rare-record membership test did not run"
    if not approved:
        why = "The release was refused (see the gate decision)."
    elif rare and rare[0].get("passed"):
        why = "The release was approved because that test and every other privacy check passed."
    else:
        why = ("The release was approved on the other privacy checks; with so few rare patients there was nothing "
               "to test them on (the anonymeter risks above show what could and could not be certified).")
    return (f"k-anonymity is {int(k)}, below min_k_anonymity {int(min_k)}: some combination of {qis} appears in "
            f"fewer than {int(min_k)} synthetic rows. The spec's min_k_anonymity is not a requirement on the "
            f"synthetic table (its rows are not people): it marks which real patients are rare (their combination "
            f"shared by fewer than {int(min_k)} real patients), the most exposed ones, and {test}. {why}")


# --------------------------------------------------------------------------- data dictionary

SYSTEM_LABELS = {"icd10cm": "ICD-10-CM", "snomed": "SNOMED CT", "loinc": "LOINC", "rxnorm": "RxNorm"}

BASE_MEANINGS = {
    "gender": "Administrative gender (FHIR Patient.gender).",
    "age": "Age in whole years at the reference date{ref}; ages of 90 and over are recorded as 90 (HIPAA Safe "
           "Harbor).",
    "race": "Race (US Core race extension, OMB category).",
    "ethnicity": "Ethnicity (US Core ethnicity extension, OMB category).",
    "deceased": "The patient is recorded as deceased.",
    "n_encounters": "Number of encounters recorded for the patient.",
    "n_enc_ambulatory": "Number of ambulatory encounters (class AMB).",
    "n_enc_inpatient": "Number of inpatient encounters (class IMP).",
    "n_enc_emergency": "Number of emergency encounters (class EMER).",
    "days_observed": "Days between the patient's first and last encounter.",
    "n_conditions": "Number of distinct condition codes recorded for the patient.",
}


def _type_of(dtype: Any, n_values: int | None = None) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(dtype):
        return "yes/no"
    if pd.api.types.is_integer_dtype(dtype):
        return "integer"
    if pd.api.types.is_float_dtype(dtype):
        return "number"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "date-time"
    return "category" + (f" ({n_values} values)" if n_values is not None else "")


def _codes_text(codes: Mapping[str, Sequence[str]]) -> str:
    return "; ".join(f"{SYSTEM_LABELS.get(system, system)} {', '.join(map(str, cs))}" for system, cs in codes.items())


def data_dictionary(synthetic: Any, dictionary: Mapping[str, Any] | None) -> list[dict]:
    """One row per released column: ``column``, ``type``, ``meaning``, ``codes``, ``unit``. ``dictionary`` is
    the prepare stage's ``model/columns.json`` (conditions and labs with codes, displays and units), plus
    ``id_columns``: released identifier columns the card's table leaves out (the synthetic row id)."""
    d = dict(dictionary or {})
    conds, labs = dict(d.get("conditions") or {}), dict(d.get("labs") or {})
    table_columns = dict(d.get("table_columns") or {})  # a flat table: its own columns and their types
    ref = f" ({d['reference_date']})" if d.get("reference_date") else ""
    out = [{"column": col, "type": "identifier", "meaning": "Row identifier of the synthetic patient (random: it links "
            "to nothing real).", "codes": "", "unit": ""} for col in d.get("id_columns") or []
           if col not in synthetic.columns]
    for col in synthetic.columns:
        s = synthetic[col]
        is_cat = not any(f(s.dtype) for f in (_is_bool, _is_num, _is_dt))
        row = {"column": col, "type": _type_of(s.dtype, int(s.nunique(dropna=True)) if is_cat else None),
               "meaning": "", "codes": "", "unit": ""}
        if col in table_columns:
            row["meaning"] = f"Column {col!r} of the source table, synthesized as {table_columns[col]}."
        elif col in BASE_MEANINGS:
            row["meaning"] = BASE_MEANINGS[col].format(ref=ref)
            if col == "age":
                row["unit"] = "years"
            elif col == "days_observed":
                row["unit"] = "days"
        elif col in conds:
            c = conds[col]
            if c.get("codes"):
                label = c.get("description") or str(c.get("concept") or col).replace("_", " ")
                row["meaning"] = f"The patient has {label} (any condition coded with one of the codes)."
                row["codes"] = _codes_text(c["codes"])
            else:
                system = SYSTEM_LABELS.get(str(c.get("system") or ""), c.get("system") or "")
                display = f": {c['display']}" if c.get("display") else ""
                row["meaning"] = f"The patient has a condition coded {system} {c.get('code')}{display}.".replace(
                    "  ", " ")
                row["codes"] = f"{system} {c.get('code')}".strip()
        elif col in labs:
            lab = labs[col]
            what = lab.get("display") or col
            row["meaning"] = f"{what}: the patient's {lab.get('agg', 'last')} value."
            row["codes"] = "LOINC " + ", ".join(lab.get("loinc") or [])
            units = [u for u in lab.get("units") or [] if u]
            row["unit"] = ", ".join(units) if units else "not recorded"
            if len(units) > 1:
                row["meaning"] += " Values in several units were pooled without conversion."
        elif col.startswith("cond_"):
            row["meaning"] = "The patient has a condition with this code (condition flag)."
        out.append(row)
    return out


def _is_bool(dtype: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_bool_dtype(dtype)


def _is_num(dtype: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(dtype)


def _is_dt(dtype: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_datetime64_any_dtype(dtype)


# --------------------------------------------------------------------------- failed expectations

_EXPECTATION_TEXT = {
    "expect_column_quantile_values_to_be_between": "quantiles within the real data's ranges",
    "expect_column_values_to_be_between": "values within the real data's range",
    "expect_column_values_to_be_in_set": "values among the real data's categories",
    "expect_column_values_to_be_in_type_list": "values of the expected type",
    "expect_column_values_to_not_be_null": "no missing values",
    "expect_column_values_to_be_unique": "unique values",
    "expect_column_pair_values_a_to_be_greater_than_b": "first column greater than the second",
    "expect_table_columns_to_match_set": "the expected set of columns",
}


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}"


def _short(values: Sequence[Any], n: int = 8) -> str:
    vals = [str(v) for v in list(values)[:n]]
    return ", ".join(vals) + (f", … ({len(values)} in all)" if len(values) > n else "")


def expectation_rows(failed: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Failed expectations for people: ``check`` (what was expected, in words), ``column``, ``observed`` and
    ``expected`` (short text, not JSON)."""
    rows = []
    for f in failed:
        kind = str(f.get("expectation") or "")
        obs = dict(f.get("observed") or {}) if isinstance(f.get("observed"), Mapping) else {}
        exp = dict(f.get("expected") or {}) if isinstance(f.get("expected"), Mapping) else {}
        observed, expected = [], []
        if obs.get("errors"):
            observed.append("could not be evaluated: " + "; ".join(map(str, obs["errors"]))[:200])
        ov = obs.get("observed_value")
        if kind == "expect_column_quantile_values_to_be_between" and isinstance(ov, Mapping):
            qs, vals = ov.get("quantiles") or [], ov.get("values") or []
            ranges = (exp.get("quantile_ranges") or {}).get("value_ranges") or []
            for i, (q, v) in enumerate(zip(qs, vals)):
                rng = ranges[i] if i < len(ranges) else None
                outside = rng is not None and v is not None and (
                    (rng[0] is not None and v < rng[0]) or (rng[1] is not None and v > rng[1]))
                if rng is None or outside:
                    observed.append(f"{_pct_label(q)} = {_num(v)}")
                    if rng is not None:
                        expected.append(f"{_pct_label(q)} in [{_num(rng[0])}, {_num(rng[1])}]")
        elif ov is not None and not isinstance(ov, (Mapping, list)):
            observed.append(f"observed {_num(ov)}")
        elif isinstance(ov, list):
            observed.append(f"observed {_short(ov)}")
        if obs.get("unexpected_percent") is not None:
            n = obs.get("unexpected_count")
            observed.append(f"{_num(obs['unexpected_percent'])} % of rows unexpected"
                            + (f" ({n} rows)" if n is not None else ""))
        if obs.get("partial_unexpected_list"):
            observed.append("e.g. " + _short(obs["partial_unexpected_list"], 5))
        if obs.get("missing_percent"):
            observed.append(f"{_num(obs['missing_percent'])} % missing")
        if obs.get("mismatched"):
            observed.append(f"mismatched: {obs['mismatched']}"[:200])
        if "min_value" in exp or "max_value" in exp:
            expected.append(f"between {_num(exp.get('min_value', '−∞'))} and {_num(exp.get('max_value', '∞'))}")
        if "value_set" in exp:
            expected.append("one of " + _short(exp["value_set"]))
        if "type_list" in exp:
            expected.append("type " + _short(exp["type_list"]))
        if "column_set" in exp:
            expected.append("columns " + _short(exp["column_set"]))
        if "mostly" in exp:
            expected.append(f"in at least {_num(float(exp['mostly']) * 100)} % of rows")
        if not expected and exp and kind != "expect_column_quantile_values_to_be_between":
            expected.append("; ".join(f"{k} {_num(v)}" for k, v in exp.items() if not isinstance(v, (dict, list))))
        rows.append({"check": _EXPECTATION_TEXT.get(kind, kind.replace("expect_", "").replace("_", " ")),
                     "expectation": kind, "column": f.get("column") or "(table)",
                     "observed": "; ".join(observed) or "—", "expected": "; ".join(expected) or "—"})
    return rows


def _pct_label(q: Any) -> str:
    try:
        x = float(q)
    except (TypeError, ValueError):
        return f"quantile {q}"
    return {0.5: "median"}.get(x, f"{x * 100:g}th percentile")
