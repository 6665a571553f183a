"""Shared fixtures of the ingest tests: a keyer, small carebundle extracts (NDJSON and transaction
Bundles of the same 40 patients), signing keys for SMART, and the local FHIR test server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthfactory.keys import Keyer

SALT = b"test-salt-0123456789abcdef"


@pytest.fixture(scope="session")
def keyer() -> Keyer:
    return Keyer(SALT)


def _carebundle() -> Path:
    exe = Path(sys.executable).with_name("carebundle")
    if exe.exists():
        return exe
    found = shutil.which("carebundle")
    if not found:
        pytest.fail("carebundle is not installed: it is pinned in requirements.txt (make install)")
    return Path(found)


def _generate(tmp_path_factory: pytest.TempPathFactory, fmt: str, count: int = 40) -> Path:
    out = tmp_path_factory.mktemp(f"carebundle_{fmt}") / "extract"
    subprocess.run([str(_carebundle()), "generate", "--profile", "mixed", "--count", str(count), "--seed", "7",
                    "--sex", "mixed", "--format", fmt, "--out", str(out)], check=True, capture_output=True,
                   timeout=180)
    return out


@pytest.fixture(scope="session")
def carebundle_extract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """carebundle --format ndjson, 40 patients, seed 7."""
    return _generate(tmp_path_factory, "ndjson")


@pytest.fixture(scope="session")
def carebundle_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """carebundle --format bundle (one transaction Bundle per patient, urn:uuid references), same patients."""
    return _generate(tmp_path_factory, "bundle")


@pytest.fixture(scope="session")
def rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def pem_of(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.fixture(scope="session")
def clinosim_fhir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clinosim US Core FHIR R4 cohort (26 resource types): $SYNTHFACTORY_CLINOSIM_FHIR when set (a larger
    one), else 40 simulated people generated here (about 20 s, offline)."""
    given = os.environ.get("SYNTHFACTORY_CLINOSIM_FHIR")
    if given:
        return Path(given)
    exe = Path(sys.executable).with_name("clinosim")
    out = tmp_path_factory.mktemp("clinosim") / "cohort"
    subprocess.run([str(exe if exe.exists() else "clinosim"), "simulate", "--country", "US", "--population", "40",
                    "--seed", "7", "--end", "2025-12-31", "--format", "fhir-r4", "--output", str(out)],
                   check=True, capture_output=True, timeout=300)
    folder = next((p.parent for p in sorted(out.rglob("Patient*.ndjson*"))), None)
    assert folder is not None, f"clinosim wrote no Patient NDJSON under {out}"
    return folder
