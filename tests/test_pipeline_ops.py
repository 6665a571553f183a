"""Pipeline operations: ingest reuse (and force re-ingest), the epochs override, structured stage logs."""

from __future__ import annotations

import logging
import shutil
import time

import pytest

from synthfactory import pipeline
from synthfactory.spec import load_spec
from tests.conftest import write_spec


@pytest.fixture()
def extract(tmp_path, small_extract):
    dest = tmp_path / "extract"
    shutil.copytree(small_extract, dest)
    return dest


def _ctx(tmp_path, extract, run_id, salt="s" * 32, **kw):
    spec_kw = kw.pop("spec_kw", {})
    spec = load_spec(write_spec(tmp_path / "specs", "reuse", extract, tmp_path / "staging", **spec_kw))
    return pipeline.RunContext(spec=spec, run_id=run_id, version="v1", salt=salt, **kw)


def test_second_run_reuses_the_ingest_of_the_same_extract(tmp_path, extract, caplog):
    caplog.set_level(logging.INFO, "synthfactory.pipeline")
    first = pipeline.ingest(_ctx(tmp_path, extract, "r1"))
    assert "reused_from_run" not in first
    second = pipeline.ingest(_ctx(tmp_path, extract, "r2"))
    assert second["reused_from_run"] == "r1"
    assert second["tables"] == first["tables"] and second["extract_sha256"] == first["extract_sha256"]
    assert "/runs/r1/" in next(iter(second["tables"].values()))
    assert "reusing the ingest output of run r1" in caplog.text
    # the next stage works from the reused output
    prepared = pipeline.prepare(_ctx(tmp_path, extract, "r2"), second)
    assert prepared["rows_train"] > 0


def test_force_ingest_and_changed_inputs_ingest_again(tmp_path, extract, caplog):
    caplog.set_level(logging.INFO, "synthfactory.pipeline")
    pipeline.ingest(_ctx(tmp_path, extract, "r1"))
    forced = pipeline.ingest(_ctx(tmp_path, extract, "r2", force_ingest=True))
    assert "reused_from_run" not in forced and "/runs/r2/" in forced["identifiers_uri"]
    assert "force_ingest=True" in caplog.text
    # another salt (keys would differ), another spec, or changed extract bytes: no reuse
    assert "reused_from_run" not in pipeline.ingest(_ctx(tmp_path, extract, "r3", salt="t" * 32))
    assert "reused_from_run" not in pipeline.ingest(
        _ctx(tmp_path, extract, "r4", spec_kw={"features__top_conditions": 3}))
    patient = next(extract.glob("Patient.ndjson*"))
    patient.write_bytes(patient.read_bytes() + b"\n")
    assert "reused_from_run" not in pipeline.ingest(_ctx(tmp_path, extract, "r5"))
    # the output a reuse points at is gone (staging cleaned up): ingest again
    shutil.rmtree(tmp_path / "staging" / "reuse" / "runs" / "r5")
    assert "reused_from_run" not in pipeline.ingest(_ctx(tmp_path, extract, "r6"))
    assert pipeline.ingest(_ctx(tmp_path, extract, "r7"))["reused_from_run"] == "r6"


def test_reuse_can_be_switched_off(tmp_path, extract):
    kw = {"spec_kw": {"operations": {"reuse_ingest": False}}}
    pipeline.ingest(_ctx(tmp_path, extract, "r1", **kw))
    assert "reused_from_run" not in pipeline.ingest(_ctx(tmp_path, extract, "r2", **kw))
    assert not (tmp_path / "staging" / "reuse" / "ingest_index").exists()


def test_cache_key_never_contains_the_salt(tmp_path, extract):
    spec = _ctx(tmp_path, extract, "r1").spec
    salt = b"a-very-secret-salt-value-0123456789"
    key = pipeline.ingest_cache_key("0" * 64, spec, salt)
    assert salt.decode() not in key and len(key) == 32
    assert key != pipeline.ingest_cache_key("0" * 64, spec, salt + b"x")


def _prepared(tmp_path, extract, **kw):
    ctx = _ctx(tmp_path, extract, "r1", **kw)
    return ctx, pipeline.prepare(ctx, pipeline.ingest(ctx))


def test_epochs_reach_neural_synthesizers_only(tmp_path, extract, monkeypatch, caplog):
    from synthfactory.synthesize import engine

    seen = {}

    def fake_fit(train, kind, params, metadata, **kwargs):
        seen[kind] = dict(params or {})
        return object(), 0.01

    monkeypatch.setattr(engine, "fit", fake_fit)
    monkeypatch.setattr(engine, "save", lambda synth, uri, store: 0)
    ctx, prepared = _prepared(tmp_path, extract, synthesizer="ctgan", epochs=3)
    fitted = pipeline.fit(ctx, prepared)
    assert seen["ctgan"]["epochs"] == 3 and fitted["epochs"] == 3
    caplog.set_level(logging.INFO, "synthfactory")
    ctx2 = _ctx(tmp_path, extract, "r1", epochs=3)
    pipeline.fit(ctx2, prepared)
    assert "epochs" not in seen["cart"]  # the demo spec's kind
    assert "epochs=3 ignored: cart is not trained in epochs" in caplog.text


def test_stage_logs_progress_timings_counts_and_failures(tmp_path, extract, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "synthfactory.pipeline")
    monkeypatch.setenv("SYNTHFACTORY_PROGRESS_SECONDS", "0.05")
    ctx = _ctx(tmp_path, extract, "r1")
    with pipeline._stage("slow", ctx) as m:
        time.sleep(0.3)
        m.update({"rows": {"patients": 12, "encounters": 40}, "rows_total": 52, "out_uri": "/x"})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage=slow dataset=reuse run=r1 start"
    assert any(line.startswith("stage=slow dataset=reuse run=r1 running elapsed=") for line in lines)
    done = lines[-1]
    assert done.startswith("stage=slow dataset=reuse run=r1 done ")
    assert "rows.patients=12" in done and "rows.encounters=40" in done and "rows_total=52" in done
    assert "seconds=" in done and "out_uri" not in done
    caplog.clear()
    with pytest.raises(ValueError):
        with pipeline._stage("bad", ctx):
            raise ValueError("patient 123 is odd")
    (failed,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failed.startswith("stage=bad dataset=reuse run=r1 failed seconds=") and failed.endswith("error=ValueError")
    assert "patient 123" not in caplog.text  # the message stays in the traceback, not in the structured line
    time.sleep(0.15)
    caplog.clear()
    time.sleep(0.15)
    assert "running elapsed" not in caplog.text  # heartbeats stop with the stage
