"""`synthfactory audit`: quality, privacy and the gate on a synthetic table made elsewhere, against a run's split."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from synthfactory.cli import main
from synthfactory.errors import EXIT_GATE, EXIT_OK, EXIT_SPEC
from tests.conftest import write_spec


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory, small_extract):
    """A run's ingest and prepare outputs (the real split) and a good synthetic table made from it by the default
    synthesizer, through the pipeline's own stage functions. Audit costs kept small (fewer re-splits, attacks)."""
    from synthfactory import pipeline
    from synthfactory.spec import load_spec

    base = tmp_path_factory.mktemp("audit")
    path = write_spec(base / "specs", "audit_demo", small_extract, base / "staging",
                      privacy__reference_resplits=5, privacy__anonymeter_attacks=0,
                      quality__reference={"resplits": 4, "matched_repeats": 1, "quality_fraction": 0.95,
                                          "pair_trends_fraction": 0.95, "column_fraction": 0.9, "noise_z": 2.0,
                                          "min_values": 50})
    ctx = pipeline.RunContext(spec=load_spec(path), run_id="r1", version="v1", base_dir=str(base))
    prepared = pipeline.prepare(ctx, pipeline.ingest(ctx))
    sampled = pipeline.sample(ctx, pipeline.fit(ctx, prepared), prepared)
    train = pd.read_parquet(prepared["train_uri"])
    good = base / "vendor.parquet"
    pd.read_parquet(sampled["synthetic_uri"]).drop(columns=["synthetic_id"]).to_parquet(good)
    return {"spec": str(path), "run_dir": ctx.run_uri, "good": good, "train": train, "base": base}


def _audit(run, synthetic, *extra):
    return main(["audit", run["spec"], "--run-dir", run["run_dir"], "--synthetic", str(synthetic), "-q", *extra])


def _no_patient_data(text: str, train: pd.DataFrame) -> None:
    for key in train["patient_key"].head(50):
        assert str(key) not in text


def test_good_table_is_approved_with_json(audited_run, capsys):
    code = _audit(audited_run, audited_run["good"], "--json", "--audit-id", "good")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    result = json.loads(out)
    assert result["approved"] is True and result["failed"] == []
    assert result["rows"] == len(pd.read_parquet(audited_run["good"]))
    assert result["quality"]["quality_score"] > 0.8 and 0.3 < result["privacy"]["dcr_share"] < 0.7
    assert any(c["name"] == "dcr_share" and c["passed"] for c in result["checks"])
    assert result["audit_uri"].endswith("runs/r1/audits/good")
    assert "approved: audit_demo audit good against run r1" in err
    _no_patient_data(out + err, audited_run["train"])
    # the audit's outputs sit beside the run, never over it; the decision is the gate's, signed
    decision = json.loads(open(result["decision_uri"]).read())
    assert decision["approved"] is True and "signature" in decision
    assert not (audited_run["base"] / "staging/audit_demo/runs/r1/gate").exists()


def test_copy_of_train_is_refused(audited_run, capsys):
    copy = audited_run["base"] / "copy.parquet"
    audited_run["train"].drop(columns=["patient_key"]).to_parquet(copy)
    code = _audit(audited_run, copy, "--audit-id", "copy")
    out, err = capsys.readouterr()
    assert code == EXIT_GATE
    assert out.startswith("refused: audit_demo audit copy")
    assert "exact_match_rate 1 > max" in out and "dcr_share 1 > max" in out
    _no_patient_data(out + err, audited_run["train"])
    assert (audited_run["base"] / "staging/audit_demo/runs/r1/audits/copy/quarantine/reasons.json").exists()


def test_bad_input_exit_2(audited_run, capsys, tmp_path):
    good = pd.read_parquet(audited_run["good"])
    cases = {
        "columns": (good.drop(columns=["bmi"]).assign(shoe_size=1), "missing column(s) ['bmi']"),
        "dtype": (good.assign(age=good["age"].astype(str)), "column 'age' is text"),
        "key": (good.assign(patient_key="x"), "patient_key"),
    }
    for name, (df, needle) in cases.items():
        path = tmp_path / f"{name}.parquet"
        df.to_parquet(path)
        assert _audit(audited_run, path) == EXIT_SPEC, name
        err = capsys.readouterr().err
        assert err.startswith("bad input: the synthetic table does not match") and needle in err, (name, err)
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert _audit(audited_run, tmp_path / "junk.parquet") == EXIT_SPEC
    assert "cannot read it as Parquet" in capsys.readouterr().err
    missing = {**audited_run, "run_dir": audited_run["run_dir"].replace("runs/r1", "runs/nope")}
    assert _audit(missing, audited_run["good"]) == EXIT_SPEC
    assert "no model/train.parquet" in capsys.readouterr().err
