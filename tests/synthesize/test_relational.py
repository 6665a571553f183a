"""Relational synthesis of the whole patient record: keys and referential integrity, children-per-parent
distributions, time constraints, tables that plug in (medication requests, procedures), and FHIR output."""

from __future__ import annotations

import orjson
import pandas as pd
import pytest

from synthfactory.synthesize import fhir_out, relational
from synthfactory.synthesize.conditional import conditional_sampler, plan_target
from synthfactory.testing.records import relational_tables


@pytest.fixture(scope="module")
def real():
    return relational_tables(80, seed=3, with_medications=True)


@pytest.fixture(scope="module")
def model(real):
    return relational.fit(real, root_params={"default_distribution": "norm"}, child_kind="gaussian_copula",
                          child_params={"default_distribution": "norm"})


@pytest.fixture(scope="module")
def synthetic(model):
    return relational.sample(model, 120, batch_size=60, seed=1)  # more patients than real, in 2 batches


def test_every_table_is_synthesized_with_fresh_keys_and_full_referential_integrity(real, synthetic):
    syn, _ = synthetic
    assert set(syn) == set(real)  # medication_request and procedure plug in: 6 tables (HMA's limit is 5)
    assert len(syn["patient"]) == 120 and syn["patient"]["patient_key"].is_unique
    for name, df in syn.items():
        assert list(df.columns) == list(real[name].columns)
        key = f"{name}_key"
        assert df[key].is_unique and df[key].str.startswith("syn-").all()
        assert not set(df[key]) & set(real[name][key])  # never a real key
    ri = relational.referential_integrity(syn)
    assert ri and all(v == 1.0 for v in ri.values()), ri
    assert "observation.encounter_key" in ri  # grandchild links restored, to the same patient's encounters
    assert syn["observation"]["encounter_key"].notna().mean() > 0.9


def test_children_per_parent_distribution_is_kept(real, synthetic):
    syn, _ = synthetic
    ks = relational.children_ks(real, syn)
    assert set(ks) == {"encounter", "condition", "observation", "medication_request", "procedure"}
    for name in ("encounter", "observation"):
        assert ks[name]["ks"] < 0.3, ks
        assert abs(ks[name]["synthetic_mean"] - ks[name]["real_mean"]) < 0.35 * ks[name]["real_mean"], ks


def test_time_constraints_and_derived_columns_hold(real, synthetic):
    syn, fixes = synthetic
    assert relational.constraint_violations(syn) == {k: 0 for k in relational.constraint_violations(syn)}
    enc = syn["encounter"]
    assert (enc["end"] >= enc["start"]).all()  # SDV Inequality in the encounter model
    births = pd.to_datetime(syn["patient"].set_index("patient_key")["birth_date"])
    obs = syn["observation"]
    assert (obs["effective"].dt.tz_convert(None) >= obs["patient_key"].map(births)).all()
    # display/unit are derived from the code (the real code -> display map), never modelled apart from it
    real_map = real["observation"].drop_duplicates("code").set_index("code")["unit"]
    assert (obs["unit"] == obs["code"].map(real_map)).all()
    lo = real["observation"].groupby("code")["value_num"].min()
    hi = real["observation"].groupby("code")["value_num"].max()
    assert obs["value_num"].between(obs["code"].map(lo), obs["code"].map(hi)).all()  # per-code value ranges
    assert all(isinstance(v, int) for v in fixes.values())


def test_rebalancing_the_patient_model_moves_whole_records(model, real):
    target = plan_target(real["patient"]["gender"], rebalance={"column": "gender",
                                                                "proportions": {"female": 0.2, "male": 0.8}})
    syn, _ = relational.sample(model, 60, root_sampler=conditional_sampler(target))
    assert (syn["patient"]["gender"] == "male").sum() == 48  # exact: 0.8 * 60
    men = set(syn["patient"].loc[syn["patient"]["gender"] == "male", "patient_key"])
    assert syn["encounter"]["patient_key"].isin(men).mean() > 0.6  # their encounters came with them


def test_hma_refuses_more_than_five_tables_with_a_clear_message(real):
    with pytest.raises(relational.RelationalError, match="hma handles at most 5 tables.*patient_centred"):
        relational.fit(real, engine="hma")


def test_dp_kinds_are_refused_in_relational_mode(real):
    with pytest.raises(relational.RelationalError, match="mode: patient_table"):
        relational.fit(real, root_kind="dp_mst")


def test_fhir_ndjson_output_is_valid_with_consistent_references(synthetic, tmp_path):
    syn, _ = synthetic
    out = fhir_out.write_fhir_ndjson(syn, str(tmp_path / "fhir"))
    assert set(out["resources"]) == {"Patient", "Encounter", "Condition", "Observation", "MedicationRequest",
                                     "Procedure"}
    assert out["resources"]["Observation"] == len(syn["observation"])
    assert out["structural_checked"] == sum(len(v) for v in syn.values())
    assert all(n > 0 for n in out["validated_r4b"].values())
    patients = {r["id"] for r in fhir_out.read_ndjson(out["files"]["Patient"])}
    encounters = {r["id"]: r["subject"]["reference"] for r in fhir_out.read_ndjson(out["files"]["Encounter"])}
    for rtype in ("Condition", "Observation", "MedicationRequest", "Procedure"):
        for r in fhir_out.read_ndjson(out["files"][rtype]):
            assert r["meta"]["tag"][0]["code"] == "HTEST"
            assert r["subject"]["reference"].split("/")[1] in patients
            if "encounter" in r:  # the encounter belongs to the same patient
                assert encounters[r["encounter"]["reference"].split("/")[1]] == r["subject"]["reference"]
    first = orjson.loads(open(out["files"]["Observation"], "rb").readline())
    assert first["valueQuantity"]["system"] == "http://unitsofmeasure.org"


def test_fhir_writer_refuses_a_dangling_reference(synthetic, tmp_path):
    syn, _ = synthetic
    broken = {"patient": syn["patient"], "encounter": syn["encounter"].assign(patient_key="syn-p99999999")}
    with pytest.raises(fhir_out.FhirOutputError, match="subject reference .* does not resolve"):
        fhir_out.write_fhir_ndjson(broken, str(tmp_path / "bad"))


def test_the_default_kind_cart_takes_relational_mode_with_cart_children():
    from synthfactory.spec import SynthesizerSpec

    spec = SynthesizerSpec(kind="cart", mode="relational")
    assert spec.relational.child_kind == "cart"
