"""Reading a release (issue #21, item 9): `synthfactory pull` downloads a version and verifies every file against
the manifest's sha256 (a tampered file is refused, naming it, and leaves nothing behind), and README's pandas,
DuckDB and Polars examples run as written against a real release in the S3 emulator."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from unittest import mock

import pytest

from synthfactory.cli import main
from synthfactory.errors import EXIT_INPUT, EXIT_OK

ROOT = Path(__file__).resolve().parents[2]


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("**Reading a release with pandas, DuckDB or Polars.**")
    section = text[start:text.index("**Human approval.**", start)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture()
def pulled(released_sandbox, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with mock.patch.dict("os.environ", released_sandbox["env"]):
        code = main(["pull", str(released_sandbox["spec_path"]), "--to", "cohort_demo_latest"])
    assert code == EXIT_OK
    folder = tmp_path / "cohort_demo_latest"
    (tmp_path / "pull.out").write_text(capsys.readouterr().out)
    return folder


def test_pull_downloads_and_verifies_the_latest_release(pulled, released_sandbox):
    manifest = json.loads((pulled / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (pulled / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    out = (pulled.parent / "pull.out").read_text()
    assert f"pulled ops_listing {manifest['version']}" in out and "each matching the manifest's sha256" in out
    assert not list(pulled.parent.glob(".*.partial"))


def test_readme_examples_run_against_a_release(pulled, released_sandbox, capsys):
    blocks = _readme_python_blocks()
    assert len(blocks) == 3  # pandas (from S3), DuckDB and Polars (on the pulled folder)
    capsys.readouterr()
    with mock.patch.dict("os.environ", released_sandbox["env"]):
        for code in blocks:
            exec(compile(code.replace("releases/cohort_demo", "releases/ops_listing"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert f"{manifest['version']} 120 rows" in out  # pandas
    assert "mean_hba1c" in out and "patients" in out  # DuckDB's table
    assert "gender" in out and "len" in out  # Polars


def _local_copy(released_sandbox, tmp_path) -> Path:
    """The release's bucket objects as a local sandbox layout (what `run --out DIR` writes to DIR/release)."""
    client, spec = released_sandbox["client"], released_sandbox["spec"]
    out = tmp_path / "out"
    for obj in client.list_objects_v2(Bucket=spec.release.bucket, Prefix="releases/ops_listing/")["Contents"]:
        path = out / "release" / obj["Key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=spec.release.bucket, Key=obj["Key"])["Body"].read())
    return out


def test_a_tampered_file_is_refused_and_nothing_is_left(released_sandbox, tmp_path, capsys):
    out = _local_copy(released_sandbox, tmp_path)
    spec_path = str(released_sandbox["spec_path"])
    assert main(["pull", spec_path, "--out", str(out), "--version", "latest", "--to", str(tmp_path / "ok")]) == 0
    (parquet,) = out.glob("release/releases/ops_listing/v*/data/patients.parquet")
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    parquet.write_bytes(bytes(data))
    capsys.readouterr()
    target = tmp_path / "tampered"
    assert main(["pull", spec_path, "--out", str(out), "--to", str(target)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("verification failed: data/patients.parquet: sha256 ") and "do not use it" in err
    assert not target.exists() and not list(tmp_path.glob(".*.partial"))
    parquet.write_bytes(bytes(data[:-10]))  # truncated
    assert main(["pull", spec_path, "--out", str(out), "--to", str(target)]) == EXIT_INPUT
    assert "bytes, the manifest says" in capsys.readouterr().err
    parquet.unlink()  # missing
    assert main(["pull", spec_path, "--out", str(out), "--to", str(target)]) == EXIT_INPUT
    assert "listed in the manifest but missing" in capsys.readouterr().err


def test_pull_refuses_a_bad_version_and_a_used_folder(released_sandbox, tmp_path, capsys):
    out = _local_copy(released_sandbox, tmp_path)
    spec_path = str(released_sandbox["spec_path"])
    assert main(["pull", spec_path, "--out", str(out), "--version", "v20990101T000000Z",
                 "--to", str(tmp_path / "x")]) == EXIT_INPUT
    assert "no such release" in capsys.readouterr().err
    assert main(["pull", spec_path, "--out", str(out), "--version", "../x", "--to", str(tmp_path / "x")]) == EXIT_INPUT
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    assert main(["pull", spec_path, "--out", str(out), "--to", str(used)]) == EXIT_INPUT
    assert "not an empty folder" in capsys.readouterr().err and (used / "mine.txt").read_text() == "keep"
    shutil.rmtree(out / "release" / "releases" / "ops_listing")
    assert main(["pull", spec_path, "--out", str(out), "--to", str(tmp_path / "y")]) == EXIT_INPUT
    assert "nothing released yet" in capsys.readouterr().err


def test_the_released_card_explains_every_figure_and_column(pulled):
    """The card a real run released (#21 item 2): every privacy figure has its meaning, every released column its
    dictionary row; the manifest carries the dataset's terms."""
    import pandas as pd

    from synthfactory.quality.cardtext import NO_MEANING

    card = (pulled / "reports" / "datacard.html").read_text()
    assert NO_MEANING not in card and 'id="privacy-figures"' in card
    assert re.search(r"<code>mia_auc</code></td><td class=\"num\">[\d.]+</td>\s*<td class=\"num\">\[[\d.]+, [\d.]+\]",
                     card)  # the MIA AUC with its interval
    dictionary = card[card.index('<section id="dictionary">'):]
    dictionary = dictionary[:dictionary.index("</section>")]
    for column in pd.read_parquet(pulled / "data" / "patients.parquet").columns:
        assert f"<code>{column}</code>" in dictionary, column
    assert "Type 2 diabetes mellitus" in dictionary and "ICD-10-CM E11*" in dictionary
    assert "LOINC 4548-4, 17856-6, 4549-2" in dictionary and "<td>%</td>" in dictionary
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert {"intended_use", "owner", "contact", "licence"} <= set(manifest)
