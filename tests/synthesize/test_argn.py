"""The tabular_argn engine: MOSTLY AI's TabularARGN in its own interpreter (.venv-argn, `make argn-venv`),
fitted and sampled through the engine interface and the pipeline stages; the model archive holds no real rows."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthfactory import pipeline as p
from synthfactory.spec import SpecError, load_spec
from synthfactory.storage import Store
from synthfactory.synthesize import engine
from synthfactory.synthesize.argn import ArgnSynthesizer, ArgnUnavailable, argn_python, restore_dtypes
from synthfactory.testing.records import write_extract
from tests.conftest import write_spec


def _table(n: int = 300, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["female", "male"], n)
    age = rng.integers(18, 90, n)
    diabetic = rng.random(n) < 0.2 + 0.004 * (age - 18)
    return pd.DataFrame({"gender": sex, "age": age, "cond_e11_9": diabetic,
                         "hba1c": np.where(diabetic, rng.normal(7.8, 0.8, n), rng.normal(5.4, 0.4, n)).round(1),
                         "n_encounters": rng.poisson(4, n)})


def test_restore_dtypes_gives_back_the_training_types():
    raw = pd.DataFrame({"flag": pd.Series(["True", "False", None], dtype="string"),
                        "age": pd.Series([40, 51, 62], dtype="Int64"), "lab": pd.Series([1, None, 2.5]),
                        "sex": pd.Series(["f", None, "m"], dtype="string"), "n": pd.Series([1.0, None, 3.0])})
    out = restore_dtypes(raw, {"sex": "object", "age": "int64", "flag": "bool", "lab": "float64", "n": "int64",
                               "missing": "float64"})
    assert list(out.columns) == ["sex", "age", "flag", "lab", "n", "missing"]
    assert out["flag"].tolist() == [True, False, False] and out["flag"].dtype == bool
    assert out["age"].dtype == "int64" and out["lab"].dtype == "float64"
    assert out["n"].dtype == "float64" and np.isnan(out["n"][1])  # an int column with a gap stays float
    assert out["sex"].tolist() == ["f", None, "m"] and out["missing"].isna().all()


def test_missing_interpreter_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHFACTORY_ARGN_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(ArgnUnavailable, match="not found or not executable"):
        argn_python()
    with pytest.raises(ArgnUnavailable, match="not found"):
        ArgnSynthesizer(python=str(tmp_path / "python")).fit({"patients": _table(20)})


def test_spec_refuses_what_tabular_argn_does_not_take(tmp_path):
    extract = tmp_path / "x"
    with pytest.raises(SpecError, match="tabular_argn does not take constraints"):
        load_spec(write_spec(tmp_path, "argn_bad", extract, tmp_path / "s", synthesizer__kind="tabular_argn",
                             synthesizer__params={},
                             synthesizer__constraints=[{"type": "inequality", "low": "age", "high": "age"}]))


def test_fit_sample_save_load_in_the_isolated_interpreter(tmp_path):
    """A real fit and sample through mostlyai-engine (1 epoch), the pickled model sampled again after a load."""
    real = _table()
    synth, seconds = engine.fit(real, engine.ARGN, {"epochs": 1, "seed": 7}, engine.metadata_dict(real))
    assert isinstance(synth, ArgnSynthesizer) and seconds > 0
    assert synth.fit_info["rows"] == len(real) and synth.fit_info["device"] in ("cpu", "cuda")
    with tarfile.open(fileobj=io.BytesIO(synth._model), mode="r:gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("model-weights.pt") for n in names)
    assert not any("tgt-data" in n or "encoded-data" in n for n in names)  # no real rows in the model
    uri = str(tmp_path / "synthesizer.pkl")
    engine.save(synth, uri, Store())
    loaded = engine.load(uri, Store())
    out = engine.sample(loaded, 500, batch_size=200)  # three batches, each from its own seed
    assert len(out) == 500 and out[engine.SYNTHETIC_ID].is_unique
    assert list(out.columns[1:]) == list(real.columns)
    assert out["cond_e11_9"].dtype == bool and out["gender"].isin(["female", "male"]).all()
    assert out["age"].between(18, 89).all()
    assert not out.iloc[:200, 1:].reset_index(drop=True).equals(out.iloc[200:400, 1:].reset_index(drop=True))


def test_pipeline_fit_and_sample_stages_with_tabular_argn(tmp_path):
    extract = Path(write_extract(str(tmp_path / "ndjson"), patients=60, seed=5))
    spec = load_spec(write_spec(tmp_path / "specs", "argn_stage", extract, tmp_path / "staging",
                                # no eGFR lab in this extract: prepare would refuse the egfr_by_sex relationship
                                features__labs=[{"name": "hba1c", "loinc": "4548-4"}], quality__relationships=[]))
    ctx = p.RunContext(spec=spec, run_id="r1", version="v1", synthesizer=engine.ARGN, epochs=1)
    prepared = p.prepare(ctx, p.ingest(ctx))
    fitted = p.fit(ctx, prepared)
    assert fitted["synthesizer"] == "tabular_argn" and fitted["epochs"] == 1.0
    assert fitted["engine"].startswith("mostlyai-engine") and fitted["device"] in ("cpu", "cuda")
    ctx.rows = 90
    sampled = p.sample(ctx, fitted, prepared)
    syn = ctx.store.read_df(sampled["synthetic_uri"])
    train = ctx.store.read_df(prepared["train_uri"])
    assert len(syn) == 90 and list(syn.columns[1:]) == list(train.columns[1:])
    assert (syn.dtypes.iloc[1:] == train.dtypes.iloc[1:]).all()
    assert Path(fitted["model_uri"]).is_file() and fitted["model_bytes"] > 0


def test_tabular_argn_chosen_at_trigger_time_is_checked_against_the_spec(tmp_path):
    """The DAG's `synthesizer` Param can pick tabular_argn for a spec whose synthesizer has constraints: the fit
    stage refuses at once (a SpecError: no retries) instead of silently dropping them."""
    spec = load_spec(write_spec(tmp_path / "specs", "argn_rt", tmp_path / "x", tmp_path / "staging",
                                synthesizer__kind="gaussian_copula",
                                synthesizer__constraints=[{"type": "inequality", "low": "age", "high": "age"}]))
    ctx = p.RunContext(spec=spec, run_id="r1", version="v1", synthesizer=engine.ARGN)
    with pytest.raises(SpecError, match="^synthesizer tabular_argn chosen for this run: kind: tabular_argn does "
                                        "not take constraints here yet") as exc:
        p.fit(ctx, {})
    assert "input_value" not in str(exc.value)
