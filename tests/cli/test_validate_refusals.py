"""`synthfactory validate` refuses (exit 2, naming the field) a staging folder where PHI would leak and a key
given twice (issue #18, item 5)."""

from __future__ import annotations

import pytest

from synthfactory.cli import main
from synthfactory.errors import EXIT_SPEC
from tests.conftest import write_spec


@pytest.mark.parametrize(("staging", "said"), [
    ("s3://synthetic-sandbox/phi", "inside the release bucket"),
    ("/", "filesystem root or a home folder"),
    ("/root", "filesystem root or a home folder"),
    ("~", "filesystem root or a home folder"),
])
def test_validate_refuses_unsafe_staging(tmp_path, capsys, staging, said):
    path = write_spec(tmp_path, "unsafe_staging", tmp_path / "extract", tmp_path / "staging")
    text = path.read_text().replace(f"uri: {tmp_path / 'staging'}", f"uri: '{staging}'")
    path.write_text(text)
    assert main(["validate", str(path)]) == EXIT_SPEC
    err = capsys.readouterr().err
    assert "staging.uri" in err and said in err, err


def test_validate_refuses_a_duplicate_key(tmp_path, capsys):
    path = write_spec(tmp_path, "dup_key", tmp_path / "extract", tmp_path / "staging")
    path.write_text(path.read_text() + "owner: someone-else\n")
    assert main(["validate", str(path)]) == EXIT_SPEC
    err = capsys.readouterr().err
    assert "duplicate key 'owner'" in err and "line" in err, err


@pytest.mark.parametrize(("overrides", "field", "column", "hint"), [
    ({"privacy__quasi_identifiers": ["agee", "gender"]}, "privacy.quasi_identifiers", "agee", "'age'"),
    ({"privacy__sensitive_attributes": ["cond_t2_diabtes"]}, "privacy.sensitive_attributes", "cond_t2_diabtes",
     "'cond_t2_diabetes'"),
    ({"quality__utility": {"target": "hb1ac"}}, "quality.utility.target", "hb1ac", "'hba1c'"),
    ({"synthesizer__constraints": [{"type": "bounds", "column": "choleterol", "min": 0}]},
     "synthesizer.constraints.0", "choleterol", ""),
])
def test_validate_refuses_columns_no_feature_can_produce(tmp_path, capsys, overrides, field, column, hint):
    """Found on the spec alone, before any extract is read (prepare would refuse them after the ingest)."""
    path = write_spec(tmp_path, "bad_columns", tmp_path / "no-extract", tmp_path / "staging", **overrides)
    assert main(["validate", str(path)]) == EXIT_SPEC
    err = capsys.readouterr().err
    assert f"{field}: {column!r} is not a column the features can produce" in err, err
    assert hint in err


def test_validate_accepts_what_the_features_may_produce(tmp_path, capsys):
    """Condition-code flags of top_conditions (cond_<code>, codes have digits) and the spec's own columns."""
    path = write_spec(tmp_path, "good_columns", tmp_path / "no-extract", tmp_path / "staging",
                      privacy__sensitive_attributes=["cond_e11_9", "hba1c"], quality__utility={"target": "cond_i10"})
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    auto = write_spec(tmp_path, "auto_columns", tmp_path / "no-extract", tmp_path / "staging",
                      features__auto=True, privacy__quasi_identifiers=["age", "creatinine"])
    assert main(["validate", str(auto)]) == 0, capsys.readouterr().err  # auto may discover any lab
