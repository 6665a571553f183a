"""The `synthfactory` command: the same pipeline as the DAG, without Airflow."""

from __future__ import annotations

import hashlib
import json

import pytest

from synthfactory.cli import main
from synthfactory.errors import EXIT_GATE, EXIT_INPUT, EXIT_OK, EXIT_SPEC
from tests.conftest import write_spec


def test_validate_ok_and_bad(tmp_path, capsys, project_root):
    assert main(["validate", str(project_root / "include/datasets/cohort_demo.yaml")]) == EXIT_OK
    assert "ok: cohort_demo" in capsys.readouterr().out
    bad = write_spec(tmp_path, "bad_one", tmp_path, tmp_path, privacy__max_dcr_share=7)
    assert main(["validate", str(bad)]) == EXIT_SPEC
    err = capsys.readouterr().err
    assert "privacy.max_dcr_share" in err and "less than or equal to 1" in err


def test_run_releases_to_out_folder(tmp_path, small_extract, capsys):
    spec = write_spec(tmp_path / "specs", "cli_ok", tmp_path / "ignored", tmp_path / "ignored-staging")
    out = tmp_path / "out"
    code = main(["run", str(spec), "--extract", str(small_extract), "--out", str(out), "--rows", "150",
                 "--run-id", "r1", "-q"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert captured.out.startswith("released cli_ok v")
    manifests = list((out / "release").rglob("manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["rows"] == 150 and manifest["synthetic"] is True
    assert len(manifest["source_extract_sha256"]) == 64 and len(manifest["spec_sha256"]) == 64
    for entry in manifest["files"]:
        data = (manifests[0].parent / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    # staging went to --out, not to the spec's staging folder
    assert (out / "staging" / "cli_ok" / "runs" / "r1" / "gate" / "decision.json").exists()
    assert not (tmp_path / "ignored-staging").exists()


def test_gate_refusal_exit_code_and_one_line_reason(tmp_path, small_extract, capsys):
    spec = write_spec(tmp_path / "specs", "cli_refused", small_extract, tmp_path / "staging",
                      privacy__min_dcr_ratio=50.0)
    out = tmp_path / "out"
    code = main(["run", str(spec), "--out", str(out), "--run-id", "r2", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_GATE
    assert err[-1].startswith("gate refused: cli_refused: ") and "privacy gate failed: dcr_ratio" in err[-1]
    assert "< min 50" in err[-1] and "(by " in err[-1]
    assert not (out / "release").exists() or not any((out / "release").rglob("*"))  # nothing released
    reasons = json.loads((out / "staging/cli_refused/quarantine/r2/reasons.json").read_text())
    assert reasons["approved"] is False and any("dcr_ratio" in f for f in reasons["failed"])
    assert (out / "staging/cli_refused/quarantine/r2/data/patients.parquet").exists()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_extract_gives_input_error(tmp_path, capsys, case):
    extract = tmp_path / "extract"
    if case == "empty":
        extract.mkdir()
    spec = write_spec(tmp_path / "specs", f"cli_{case}", extract, tmp_path / "staging")
    code = main(["run", str(spec), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert ("extract not found" if case == "missing" else "extract is empty") in err


def test_unknown_profile_is_a_spec_error(tmp_path, small_extract, capsys):
    spec = write_spec(tmp_path / "specs", "cli_prof", small_extract, tmp_path / "staging")
    assert main(["run", str(spec), "--profile", "nope", "--out", str(tmp_path / "o")]) == EXIT_SPEC
    assert "unknown profile 'nope'" in capsys.readouterr().err
