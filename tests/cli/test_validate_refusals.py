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
