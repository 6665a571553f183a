"""Event timing of the synthetic record (relational mode, CART children): children of an encounter fall inside
it, a patient's encounters are spaced as real ones are, the kind of encounter a row belongs to is drawn with
the row, and only aggregates of the real times are kept in the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthfactory.quality import tables as qt
from synthfactory.synthesize import relational
from synthfactory.testing.records import relational_tables


@pytest.fixture(scope="module")
def real():
    return relational_tables(150, seed=11, with_medications=True)


@pytest.fixture(scope="module")
def model(real):
    return relational.fit(real, root_kind="cart", child_kind="cart", seed=1)


@pytest.fixture(scope="module")
def synthetic(model):
    return relational.sample(model, 150, batch_size=80, seed=2)


def test_children_of_an_encounter_fall_inside_it(real, synthetic):
    syn, fixes = synthetic
    for name, time in (("observation", "effective"), ("condition", "onset"), ("medication_request", "authored_on")):
        assert qt.in_encounter_share(real, name, time) == 1.0  # the generator's rows sit at their visit
        share = qt.in_encounter_share(syn, name, time)
        assert share is not None and share >= 0.98, (name, share)
    assert fixes["observation_placed_in_encounter"] > 0


def test_no_child_row_after_the_reference_date(model, synthetic):
    syn, fixes = synthetic
    ref = model.layout.reference
    for name, time in (("observation", "effective"), ("condition", "onset"), ("medication_request", "authored_on"),
                       ("procedure", "performed")):
        assert (syn[name][time].dropna() <= ref).all(), name
    assert sum(v for k, v in fixes.items() if k.endswith("_after_placement")) <= 5  # stays seen until the reference


def test_without_the_placement_children_drift_out_of_their_encounter(model, monkeypatch):
    """The check can fail: rows linked to the nearest encounter but left at their drawn time."""
    monkeypatch.setattr(relational, "place_in_encounters", lambda df, *a, **k: df)
    syn, _ = relational.sample(model, 150, batch_size=80, seed=2)
    assert qt.in_encounter_share(syn, "observation", "effective") < 0.5


def test_an_encounter_lasts_as_long_as_real_ones_of_its_class(real, model, synthetic):
    syn, fixes = synthetic
    # pooled over three draws: the median of one draw's ~50 stays swings from 49 to 85 hours by seed
    pooled = pd.concat([syn["encounter"]] + [relational.sample(model, 150, batch_size=80, seed=s)[0]["encounter"]
                                             for s in (3, 4)], ignore_index=True)
    hours = {n: (e["end"] - e["start"]).dt.total_seconds().groupby(e["class_code"]).median() / 3600
             for n, e in (("real", real["encounter"]), ("syn", pooled))}
    assert hours["real"]["IMP"] > 24 and hours["syn"]["IMP"] > 24  # a stay is days, a visit minutes
    for cls in ("AMB", "IMP"):
        assert hours["syn"][cls] == pytest.approx(hours["real"][cls], rel=0.35), hours
    assert fixes["encounter_duration_redrawn"] > 0


def test_a_patients_encounters_are_spaced_as_real_ones(real, synthetic):
    syn, fixes = synthetic
    r, s = qt.intervals_days(real["encounter"], "start"), qt.intervals_days(syn["encounter"], "start")
    assert s.size > 100 and (s > 0).mean() > 0.9  # a sequence, not a pile on one day
    from scipy.stats import ks_2samp

    assert ks_2samp(r, s).statistic < 0.15, (np.quantile(r, [0.25, 0.5, 0.75]), np.quantile(s, [0.25, 0.5, 0.75]))
    assert fixes["encounter_respaced"] == len(syn["encounter"])
    start = syn["encounter"]["start"]
    assert (start == start.max()).sum() <= 2 and (start == start.min()).sum() <= 2  # no pile on the window's edges
    enc = syn["encounter"].merge(syn["patient"][["patient_key", "birth_date"]], on="patient_key")
    assert (enc["start"].dt.tz_convert(None) >= enc["birth_date"].astype("datetime64[ns]")).all()
    assert (enc["end"] >= enc["start"]).all()


def test_the_encounter_class_is_drawn_with_the_row(real, model, synthetic):
    syn, _ = synthetic
    assert relational.ENC_CLASS in model.children["procedure"].cart.columns
    assert model.children["observation"].encounter_classes  # rows given the kinds of encounter a patient has
    assert model.children["encounter"].load_tables  # encounters given the size of the rest of the record
    enc_class = syn["encounter"].set_index("encounter_key")["class_code"]
    real_class = real["encounter"].set_index("encounter_key")["class_code"]
    share = {n: df["encounter_key"].map(c).value_counts(normalize=True)
             for n, df, c in (("real", real["observation"], real_class), ("syn", syn["observation"], enc_class))}
    for cls in ("AMB", "IMP"):
        assert abs(share["real"].get(cls, 0) - share["syn"].get(cls, 0)) < 0.15, share


def test_the_model_keeps_aggregates_of_the_real_times_only(real, model):
    gaps = model.layout.children["encounter"].timing["gaps"]
    assert set(gaps) == {"quantiles", "window", "durations", "spans"}
    assert all(len(q) == relational.POSITION_QUANTILES for q in gaps["quantiles"].values())
    counts = real["encounter"]["class_code"].value_counts()
    assert set(gaps["durations"]) == set(counts[counts >= 50].index)  # classes with >= 50 encounters, as quantiles
    assert all(len(q) == relational.POSITION_QUANTILES for q in gaps["durations"].values())
    obs = model.layout.children["observation"].timing
    assert set(obs) == {"at_start", "first_at_start", "new_time", "u_quantiles", "points", "by_class", "unlinked_at_start",
                        "coverage", "near_share", "near_quantiles"}
    assert obs["at_start"] == 1.0
    # the gaps between distinct times kept as a share and quantiles of seconds, never as times
    assert 0.0 <= obs["near_share"] <= 1.0
    assert len(obs["near_quantiles"]) in (0, relational.NEAR_QUANTILES)
    assert all(0.0 <= g <= relational.NEAR_SECONDS for g in obs["near_quantiles"])
    import pandas as pd

    window = [pd.Timestamp(w) for w in gaps["window"]]  # whole days, not an encounter's own instant
    assert all(w == w.normalize() for w in window)
    starts = real["encounter"]["start"].dt.tz_convert(None)
    assert window[0] <= starts.min() and starts.max() < window[1]


def test_the_pipeline_flags_the_trajectory_condition_and_gates_the_timing(tmp_path):
    """Spec ``quality.trajectory`` through prepare, fit, sample and quality (relational, cart): the condition is a
    patient flag of the model, and the quality summary's per-table gate carries the timing, co-occurrence and
    trajectory rows with their rule, each beside its reference."""
    from synthfactory import pipeline as p
    from synthfactory.release.gate import quality_checks
    from synthfactory.spec import load_spec
    from synthfactory.synthesize.engine import load
    from synthfactory.testing.records import write_extract
    from tests.conftest import write_spec

    extract = write_extract(str(tmp_path / "ndjson"), patients=90, seed=4, with_medications=True)
    spec = load_spec(write_spec(tmp_path / "specs", "rel_timing", extract, tmp_path / "staging",
                                features__labs=[{"name": "hba1c", "loinc": "4548-4"}], quality__relationships=[],
                                quality__utility=None, synthesizer__mode="relational",
                                quality__trajectory={"lab": "hba1c", "group_by_condition": "diabetes",
                                                     "condition_codes": {"icd10cm": ["E11*"]}, "period_days": 730,
                                                     "periods": 2, "min_values": 5}))
    ctx = p.RunContext(spec=spec, run_id="r1", version="v1")
    prepared = p.prepare(ctx, p.ingest(ctx))
    fitted = p.fit(ctx, prepared)
    model = load(fitted["model_uri"], ctx.store)
    assert "E11.9" in model.layout.flags  # the trajectory's condition drawn as a patient flag
    ctx.rows = 90
    sampled = p.sample(ctx, fitted, prepared)
    summary = p.quality(ctx, prepared, sampled)
    rows = {(t, c["figure"]): c for t, g in summary["tables"]["tables"].items() for c in g["checks"]}
    assert {("encounter", "interval_ks"), ("observation", "in_encounter"), ("observation", "trajectory")} <= set(rows)
    assert all(r["reference"] is not None and r["rule"] for r in rows.values() if r["figure"] != "checks")
    names = {c.name for c in quality_checks(summary, spec.quality)}
    assert {"table.encounter.interval_ks", "table.observation.trajectory"} <= names
    report = ctx.store.read_json(summary["report_uri"])
    assert report["tables"]["trajectory"]["lab"] == "hba1c"
    assert "with/0" in report["tables"]["figures"]["tables"]["observation"]["trajectory_real"]


def _bursts(n_enc: int = 150, seed: int = 4):
    """Inpatient stays of 100 h whose observations come in rounds: a round at a random moment, its results
    stamped 0-3 times more, 5-40 seconds apart (as real stays' results are)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2025-01-01")
    enc = pd.DataFrame({"encounter_key": [f"e{i}" for i in range(n_enc)], "patient_key": [f"p{i}" for i in range(n_enc)],
                        "class_code": "IMP", "start": [start + pd.Timedelta(days=3 * i) for i in range(n_enc)]})
    enc["end"] = enc["start"] + pd.Timedelta(hours=100)
    rows = []
    for e in enc.itertuples():
        for _ in range(6):
            t = e.start + pd.Timedelta(seconds=float(rng.uniform(0, 100 * 3600)))
            for k in range(int(rng.integers(1, 5))):
                t = t + pd.Timedelta(seconds=float(rng.uniform(5, 40))) if k else t
                rows.append((e.patient_key, e.encounter_key, t))
    return enc, pd.DataFrame(rows, columns=["patient_key", "encounter_key", "effective"])


def _near_share(df, enc) -> float:
    t = df.drop_duplicates(["encounter_key", "effective"]).sort_values(["encounter_key", "effective"])
    gap = t.groupby("encounter_key")["effective"].diff().dt.total_seconds().dropna()
    return float((gap <= relational.NEAR_SECONDS).mean())


def test_a_stays_results_come_seconds_apart_as_real_ones_do():
    enc, obs = _bursts()
    timing = relational.encounter_timing(obs, enc, "effective")
    real_share = _near_share(obs, enc)
    assert timing["near_share"] == pytest.approx(real_share, abs=1e-6) and real_share > 0.4
    q = timing["near_quantiles"]
    assert len(q) == relational.NEAR_QUANTILES and 5.0 <= q[len(q) // 2] <= 40.0 and q[-1] <= relational.NEAR_SECONDS
    cl = relational.ChildLayout(name="observation", key="observation_key", time="effective", later_times=[],
                                columns=[], derived={}, constants={}, all_columns=[], timing=timing)
    placed = relational.place_in_encounters(obs.copy(), cl, enc, np.random.default_rng(1), {})
    # drawn given the aggregates only: as many rounds' results seconds apart as real stays have, inside the stay
    assert _near_share(placed, enc) == pytest.approx(real_share, abs=0.06)
    inside = placed.merge(enc[["encounter_key", "start", "end"]], on="encounter_key")
    assert ((inside["effective"] >= inside["start"]) & (inside["effective"] <= inside["end"] + np.timedelta64(200, "s"))).all()
    # without the near gaps each time is at its own position: hours apart
    flat = relational.place_in_encounters(obs.copy(), relational.ChildLayout(
        name="observation", key="observation_key", time="effective", later_times=[], columns=[], derived={},
        constants={}, all_columns=[], timing={**timing, "near_share": 0.0, "by_class": {
            c: {**st, "near_share": 0.0} for c, st in timing["by_class"].items()}}), enc, np.random.default_rng(1), {})
    assert _near_share(flat, enc) < 0.1
