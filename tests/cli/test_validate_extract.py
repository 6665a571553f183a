"""`synthfactory validate SPEC --extract DIR`: the spec's features checked on an extract, before any run."""

from __future__ import annotations

from synthfactory.cli import main
from synthfactory.errors import EXIT_INPUT, EXIT_OK, EXIT_SPEC
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
    unknown = write_spec(tmp_path / "specs", "val_unknown", tmp_path / "nowhere", tmp_path / "staging",
                         features__labs=labs, privacy__quasi_identifiers=["age", "gender", "postcode"])
    # a column no feature can produce is refused on the spec alone (#21 item 4), before any extract is read
    assert main(["validate", str(unknown), "--extract", str(small_extract)]) == EXIT_SPEC
    assert "privacy.quasi_identifiers: 'postcode' is not a column" in capsys.readouterr().err
    spec = write_spec(tmp_path / "specs", "val_bad", tmp_path / "nowhere", tmp_path / "staging", features__labs=labs)
    assert main(["validate", str(spec)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("ok: val_bad")
    assert main(["validate", str(spec), "--extract", str(small_extract)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "bad input: the extract cannot produce what the spec asks for" in err
    assert "features.labs.egfr: no numeric values for LOINC 48642-3; the extract has this lab as loinc 98979-8" in err
    assert "quality.relationships.egfr_by_sex.measure: 'egfr'" in err
    assert "conditions (top" in err and "icd10cm I10" in err and "numeric labs (top" in err


def test_validate_extract_missing_folder_is_bad_input(tmp_path, capsys):
    spec = write_spec(tmp_path / "specs", "val_missing", tmp_path / "nowhere", tmp_path / "staging")
    assert main(["validate", str(spec), "--extract", str(tmp_path / "absent")]) == EXIT_INPUT
    assert "extract not found" in capsys.readouterr().err
