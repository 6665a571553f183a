"""`synthfactory validate SPEC --extract DIR`: the spec's features checked on an extract, before any run."""

from __future__ import annotations

from synthfactory.cli import main
from synthfactory.errors import EXIT_INPUT, EXIT_OK
from tests.conftest import write_spec


def test_validate_extract_ok(tmp_path, small_extract, capsys):
    spec = write_spec(tmp_path / "specs", "val_ok", tmp_path / "nowhere", tmp_path / "staging")
    assert main(["validate", str(spec), "--extract", str(small_extract)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("ok: val_ok") and "400 patients" in out
    assert "egfr (400)" in out and "cond_t2_diabetes (" in out and "cond_hypertension (" in out
    assert not (tmp_path / "staging").exists()  # ingested into a temporary folder only


def test_validate_extract_refuses_what_the_extract_cannot_produce(tmp_path, small_extract, capsys):
    labs = [{"name": "hba1c", "loinc": "4548-4"}, {"name": "egfr", "loinc": "48642-3"}]  # clinosim's eGFR code
    spec = write_spec(tmp_path / "specs", "val_bad", tmp_path / "nowhere", tmp_path / "staging",
                      features__labs=labs, privacy__quasi_identifiers=["age", "gender", "postcode"])
    # without --extract the spec is valid as before (a column no feature produces is only a warning)
    assert main(["validate", str(spec)]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out.startswith("ok: val_bad") and "'postcode' is not a column" in captured.err
    assert main(["validate", str(spec), "--extract", str(small_extract)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "\nbad input: the extract cannot produce what the spec asks for" in err
    assert "features.labs.egfr: no numeric values for LOINC 48642-3; the extract has this lab as loinc 98979-8" in err
    assert "privacy.quasi_identifiers: 'postcode'" in err
    assert "quality.relationships.egfr_by_sex.measure: 'egfr'" in err
    assert "conditions (top" in err and "icd10cm I10" in err and "numeric labs (top" in err


def test_validate_extract_missing_folder_is_bad_input(tmp_path, capsys):
    spec = write_spec(tmp_path / "specs", "val_missing", tmp_path / "nowhere", tmp_path / "staging")
    assert main(["validate", str(spec), "--extract", str(tmp_path / "absent")]) == EXIT_INPUT
    assert "extract not found" in capsys.readouterr().err
