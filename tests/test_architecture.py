"""The library's layer rules (.importlinter) hold: the domain never imports Airflow, stages import only
downward, no import cycles. import-linter is pinned in requirements.txt, so this runs in CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe), "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    """The contracts are not vacuous: a stage importing upward (ingest -> release) breaks the layers."""
    config = (ROOT / ".importlinter").read_text()
    bad = tmp_path / "contracts.ini"
    # the same layers, with ingest moved above release: the real release -> ... imports now point upward
    bad.write_text(config.replace("    release\n", "    ingest_placeholder\n").replace(
        "    ingest\n", "    release\n").replace("    ingest_placeholder\n", "    ingest\n"))
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe), "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout
