"""Event timing and cross-table figures of relational mode (synthfactory.quality.tables), each judged against
real held-out vs real train patients: fresh real-like patients pass; shuffled dates, encounters all on one
day, codes recombined across patients and a lab cut from its condition each fail their own check, and the
release gate says the rule in the check's text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthfactory.quality import tables as qt
from synthfactory.spec import ConditionConcept
from synthfactory.testing.records import relational_tables

TRAJECTORY = qt.Trajectory(lab="hba1c", loinc=("4548-4",), period_days=730, periods=3, min_values=10,
                           condition=ConditionConcept(name="diabetes", codes={"icd10cm": ["E11*"]}))


@pytest.fixture(scope="module")
def real():
    return relational_tables(160, seed=5, with_medications=True)


@pytest.fixture(scope="module")
def fresh():
    """Other real-like patients of the same generator: what a perfect synthesizer would produce."""
    return relational_tables(160, seed=6, with_medications=True)


@pytest.fixture(scope="module")
def big():
    """400 patients (patient, condition, observation): enough diabetics per period and enough pairs of codes
    for the trajectory and the co-occurrence (their real reference, a fresh real-like cohort)."""
    three = ("patient", "condition", "observation")
    real = {k: v for k, v in relational_tables(400, seed=7).items() if k in three}
    fresh = {k: v for k, v in relational_tables(400, seed=8).items() if k in three}
    # the 3 most prevalent codes: their pairs are frequent enough to tell from noise at 100 held-out patients
    ref = qt.relational_reference(real, holdout_fraction=0.25, resplits=3, max_rows=500, seed=1,
                                  trajectory=TRAJECTORY, cooccurrence_top=3)
    return real, fresh, ref


@pytest.fixture(scope="module")
def reference(real):
    return qt.relational_reference(real, holdout_fraction=0.25, resplits=3, max_rows=1000, seed=1,
                                   trajectory=TRAJECTORY, cooccurrence_top=6)


TIME_FIGURES = {f for f, _, _ in qt.RELATIVE_TIME_FIGURES}


def _gate(real, syn, reference, top=6):
    fig = qt.synthetic_figures(real, syn, patients=reference["holdout_patients"], repeats=1, max_rows=1000,
                               trajectory=TRAJECTORY, cooccurrence_top=top)
    gate = qt.gate_tables(fig, reference, None, noise_z=2.0, trajectory_margin=TRAJECTORY.margin)
    # the timing and cross-table checks that failed (the per-table quality / counts are tests/quality/test_tables)
    failed = {n: {c["figure"] for c in t["checks"] if not c["passed"]} & TIME_FIGURES
              for n, t in gate["tables"].items()}
    return gate, fig, failed


def _figures(gate, table):
    return {c["figure"]: c for c in gate["tables"][table]["checks"]}


def test_the_reference_has_every_timing_and_cross_table_figure(real, reference):
    t = reference["tables"]
    for name in ("encounter", "observation"):
        assert {"interval_ks", "first_age_ks"} <= set(t[name]), name
    # 50 procedures among 160 patients: a KS of ~12 held-out values is noise, so no figure (and no check)
    assert "interval_ks" not in t["procedure"] and "first_age_ks" not in t["procedure"]
    for name in ("condition", "observation", "medication_request", "procedure"):
        assert t[name]["in_encounter"]["mean"] == pytest.approx(1.0)  # the generator's children sit in their visit
    assert t["condition"]["cooccurrence_codes"]["mean"] == 6
    assert 0 <= t["condition"]["cooccurrence_mad"]["mean"] < 0.05
    assert 0 < t["condition"]["cooccurrence_error"]["mean"] < 1
    cells = t["observation"]["trajectory_real"]
    assert {"with/0", "without/0"} <= set(cells)  # hba1c in patients with vs without diabetes
    assert cells["with/0"]["mean"] > cells["without/0"]["mean"] + 1.0  # the generator's diabetic shift (1.8)
    assert all(v["mean"] >= 0 for v in cells.values())


def test_fresh_real_like_patients_pass_every_timing_check(real, fresh, reference):
    gate, fig, failed = _gate(real, fresh, reference)
    assert not any(failed.values()), failed
    enc = _figures(gate, "encounter")
    assert {"interval_ks", "first_age_ks"} <= set(enc)
    assert {"in_encounter"} <= set(_figures(gate, "observation"))
    assert "cooccurrence_error" in _figures(gate, "condition")
    assert "trajectory" in _figures(gate, "observation")
    assert "KS of the days between a patient's consecutive events <= the real reference + 0.05" in \
        enc["interval_ks"]["rule"]


def test_shuffled_dates_break_the_order_check(real, fresh, reference):
    """Observation dates shuffled across rows: children no longer inside their encounter."""
    syn = dict(fresh)
    obs = syn["observation"].copy()
    obs["effective"] = obs["effective"].sample(frac=1.0, random_state=0).to_numpy()
    syn["observation"] = obs
    gate, _, failed = _gate(real, syn, reference)
    assert "in_encounter" in failed["observation"]
    assert _figures(gate, "observation")["in_encounter"]["value"] < 0.2
    assert not failed["encounter"]


def test_encounters_all_on_one_day_fail_the_interval_check(real, fresh, reference):
    syn = dict(fresh)
    enc = syn["encounter"].copy()
    first = enc.groupby("patient_key")["start"].transform("min")
    dur = enc["end"] - enc["start"]
    enc["start"], enc["end"] = first, first + dur
    syn["encounter"] = enc
    gate, _, failed = _gate(real, syn, reference)
    assert "interval_ks" in failed["encounter"]
    assert _figures(gate, "encounter")["interval_ks"]["value"] > 0.5  # every interval 0 days


def test_codes_recombined_across_patients_fail_the_cooccurrence_check(big):
    """Each code given to as many patients as really hold it, but never two codes to one patient: every code's
    prevalence kept, every pair lost."""
    real, fresh, ref = big
    _, _, ok = _gate(real, fresh, ref, top=3)
    assert not ok["condition"], ok
    syn = dict(fresh)
    rng = np.random.default_rng(0)
    free = list(rng.permutation(syn["patient"]["patient_key"].to_numpy()))
    rows = []
    for code, g in syn["condition"].groupby("code"):
        g = g.drop_duplicates("patient_key")
        holders, free = free[: len(g)], free[len(g):]
        rows.append(g.assign(patient_key=holders))
    syn["condition"] = pd.concat(rows, ignore_index=True)
    gate, fig, failed = _gate(real, syn, ref, top=3)
    row = _figures(gate, "condition")["cooccurrence_error"]
    assert "cooccurrence_error" in failed["condition"], row
    assert row["value"] == pytest.approx(1.0)  # no pair left: as far as can be
    assert fig["tables"]["condition"]["cooccurrence_mad"]["mean"] > ref["tables"]["condition"]["cooccurrence_mad"][
        "mean"]


def test_a_lab_cut_from_its_condition_fails_the_trajectory_check(big):
    """hba1c values reversed between the groups (the lowest to the diabetics): the trajectory check fails,
    the real-like patients of the same generator pass it."""
    real, fresh, ref = big
    _, _, ok = _gate(real, fresh, ref, top=3)
    assert not ok["observation"], ok
    syn = dict(fresh)
    obs = syn["observation"].copy()
    diabetic = obs["patient_key"].isin(set(syn["condition"].loc[syn["condition"]["code"] == "E11.9", "patient_key"]))
    lab = (obs["code"] == "4548-4").to_numpy()
    values = np.sort(obs.loc[lab, "value_num"].to_numpy())
    order = np.argsort(~diabetic[lab].to_numpy(), kind="stable")  # diabetics first: they get the lowest values
    new = np.empty_like(values)
    new[order] = values
    obs.loc[lab, "value_num"] = new
    syn["observation"] = obs
    gate, fig, failed = _gate(real, syn, ref, top=3)
    assert "trajectory" in failed["observation"], _figures(gate, "observation")["trajectory"]
    f = fig["tables"]["observation"]
    assert f["trajectory_other"]["with/0"]["mean"] < f["trajectory_real"]["with/0"]["mean"] - 1.0


def test_the_release_gate_and_the_data_card_say_the_rule(real, fresh, reference):
    from jinja2 import Environment

    from synthfactory.quality.datacard import _TABLES_SECTION, _table_rows, fmt
    from synthfactory.release.gate import quality_checks
    from synthfactory.spec import QualityThresholds

    syn = dict(fresh)
    enc = syn["encounter"].copy()
    enc["start"] = enc.groupby("patient_key")["start"].transform("min")
    enc["end"] = enc["start"]
    syn["encounter"] = enc
    gate, fig, _ = _gate(real, syn, reference)
    checks = {c.name: c for c in quality_checks({"tables": gate, "quality_score": 0.9,
                                                 "expectation_success_ratio": 1.0}, QualityThresholds())}
    bad = checks["table.encounter.interval_ks"]
    assert not bad.passed and bad.reference["mean"] is not None
    assert "[rule: KS of the days between a patient's consecutive events <= the real reference + 0.05 + 2 " \
           "reference sd]" in bad.describe()
    assert checks["table.observation.trajectory"].passed and checks["table.condition.cooccurrence_error"].passed
    html = Environment(autoescape=True).from_string(_TABLES_SECTION).render(
        rows=_table_rows({"gate": gate, "figures": fig, "reference": reference}), fmt=fmt)
    assert "interval_ks" in html and "share of encounter-linked rows inside their encounter" in html
    assert "with/0" in html  # the trajectory cells, synthetic beside real and real held-out


def test_trajectory_spec_resolves_features_and_refuses_unknown_names():
    from pathlib import Path

    import yaml

    from synthfactory.spec import FeatureSpec, SpecError, TrajectorySpec, parse_spec

    features = FeatureSpec(labs=[{"name": "hba1c", "loinc": "4548-4"}],
                           conditions=[{"name": "diabetes", "codes": {"icd10cm": ["E11*"]}}])
    lab, concept = TrajectorySpec(lab="hba1c", group_by_condition="diabetes").resolve(features)
    assert lab.loinc == ["4548-4"] and concept.codes == {"icd10cm": ["E11*"]}
    tr = qt.Trajectory.from_spec(TrajectorySpec(lab="glucose", loinc="2345-7", group_by_condition="dm",
                                                condition_codes={"icd10cm": ["E11*"]}, period_days=90), FeatureSpec())
    assert tr.loinc == ("2345-7",) and tr.period_days == 90
    with pytest.raises(ValueError, match="quality.trajectory.group_by_condition"):
        TrajectorySpec(lab="hba1c", group_by_condition="no_such_concept").resolve(features)
    with pytest.raises(ValueError, match="not a LOINC code"):
        TrajectorySpec(lab="x", loinc="hba1c", group_by_condition="diabetes")
    demo = yaml.safe_load((Path(__file__).resolve().parents[2] / "include/datasets/cohort_demo.yaml").read_text())
    demo["quality"]["trajectory"] = {"lab": "hba1c_unknown", "group_by_condition": "diabetes_unknown"}
    with pytest.raises(SpecError, match="quality.trajectory.lab"):
        parse_spec(demo, origin="bad.yaml")
    demo["quality"]["trajectory"] = {"lab": "hba1c", "loinc": "4548-4", "group_by_condition": "dm",
                                     "condition_codes": {"icd10cm": ["E11*"]}, "period_days": 180}
    demo["quality"]["relational"] = {"interval_ks_margin": 0.03}
    spec = parse_spec(demo)
    assert spec.quality.trajectory.period_days == 180 and spec.quality.relational.interval_ks_margin == 0.03


def test_a_figure_whose_reference_came_from_one_resplit_is_reported_not_gated():
    fig = {"tables": {"procedure": {"interval_ks": {"mean": 0.30}, "first_age_ks": {"mean": 0.30}}}}
    one = {"mean": 0.16, "sd": 0.0, "n": 1}
    two = {"mean": 0.16, "sd": 0.01, "n": 2}
    ref = {"tables": {"procedure": {"interval_ks": one, "first_age_ks": two}}}
    gate = qt.gate_tables(fig, ref, None, noise_z=2.0)["tables"]["procedure"]
    assert [r["figure"] for r in gate["checks"]] == ["first_age_ks"]  # judged: two re-splits, and it fails
    assert not gate["passed"] and gate["unjudged"] == ["interval_ks"]


def test_a_figure_too_thin_to_measure_on_both_sides_is_not_gated():
    """No synthetic value (too few intervals at the held-out size) where real held-out patients too had too few in
    some re-splits: reported, not gated; where every real re-split measured it, the missing figure fails."""
    fig = {"tables": {"procedure": {"interval_ks": {"mean": None}}}}
    thin = {"tables": {"procedure": {"interval_ks": {"mean": 0.2, "sd": 0.05, "n": 3}}}, "resplits": 8}
    gate = qt.gate_tables(fig, thin, None, noise_z=2.0)["tables"]["procedure"]
    assert gate["passed"] and gate["unjudged"] == ["interval_ks"] and gate["checks"] == []
    full = {"tables": {"procedure": {"interval_ks": {"mean": 0.2, "sd": 0.05, "n": 8}}}, "resplits": 8}
    gate = qt.gate_tables(fig, full, None, noise_z=2.0)["tables"]["procedure"]
    assert not gate["passed"] and gate["checks"][0]["figure"] == "interval_ks"
