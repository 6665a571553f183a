"""Shared fixtures. Airflow's environment is pinned here, before anything imports airflow, so tests never
touch a user's ~/airflow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_AF_HOME = Path(tempfile.mkdtemp(prefix="sf-airflow-home-"))
os.environ.setdefault("AIRFLOW_HOME", str(_AF_HOME))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_AF_HOME / 'airflow.db'}")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def small_extract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline FHIR R4 NDJSON extract of 160 patients (carebundle, deterministic)."""
    from synthfactory.testing.dev import generate_sample_extract

    # 400 patients: the smallest carebundle cohort on which the default synthesizer's output passes every gate
    # relative to real data (at 160, a CART leaf of 30 real rows cannot separate the ~30 diabetics)
    return generate_sample_extract(tmp_path_factory.mktemp("extract") / "ndjson", patients=400, seed=7)


def write_spec(folder: Path, name: str, extract: Path, staging: Path, **overrides: object) -> Path:
    """A dataset spec for tests: the demo spec with absolute source/staging and optional overrides."""
    import yaml

    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data["name"] = name
    data["source"]["uri"] = str(extract)
    data["staging"]["uri"] = str(staging)
    data["features"]["min_patients"] = 20
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def open_gates() -> dict:
    """write_spec overrides that let any data through every numeric gate (min_* at its lowest allowed value,
    max_* at its highest), with the slow optional audits off and the leak scan on: for tests about
    orchestration (routing, releases listing), whatever thresholds the spec model has grown."""
    from annotated_types import Ge, Gt, Le

    from synthfactory.spec import PrivacyThresholds, QualityThresholds

    out: dict = {}
    for section, model in (("quality", QualityThresholds), ("privacy", PrivacyThresholds)):
        fields = model.model_fields
        for name, info in fields.items():
            lo = next((m.ge for m in info.metadata if isinstance(m, Ge)), None)
            if lo is None:
                lo = next((m.gt + 1e-6 for m in info.metadata if isinstance(m, Gt)), 0.0)
            hi = next((m.le for m in info.metadata if isinstance(m, Le)), 1e9)
            if name.startswith("min_"):
                out[f"{section}__{name}"] = lo
            elif name.startswith("max_"):
                out[f"{section}__{name}"] = hi
        for name, value in (("relationships", []), ("utility", None), ("quasi_identifiers", []),
                            ("sensitive_attributes", []), ("anonymeter_attacks", 0),
                            ("reference_resplits", 0)):  # no privacy reference: only the (open) caps apply
            if name in fields:
                out[f"{section}__{name}"] = value
    # the membership-inference battery: its cheapest attack only (no shadow models), thresholds wide open
    out["privacy__mia"] = {"attacks": ["distance"], "max_auc": 1.0, "max_tpr_at_fpr_01": 1.0, "bootstrap": 20}
    # the quality figures judged against the real-data reference: the smallest fractions, the fewest re-splits
    out["quality__reference"] = {"resplits": 2, "matched_repeats": 1, "quality_fraction": 1e-6,
                                 "pair_trends_fraction": 1e-6, "column_fraction": 1e-6}
    return out


@pytest.fixture(scope="session")
def released_sandbox(tmp_path_factory: pytest.TempPathFactory, small_extract: Path):
    """One real release into the S3 emulator's sandbox bucket, made by `synthfactory run` through boto3's
    default chain (AWS_ENDPOINT_URL), with open gates. For the release listings (CLI, UI page)."""
    from unittest import mock

    from synthfactory.testing import dev
    from synthfactory.cli import main
    from synthfactory.spec import load_spec

    base = tmp_path_factory.mktemp("sandbox")
    spec_path = write_spec(base / "specs", "ops_listing", small_extract, base / "staging", **open_gates())
    spec = load_spec(spec_path)
    with dev.S3Emulator() as s3:
        client = s3.client()
        client.create_bucket(Bucket=spec.release.bucket)
        env = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": dev.REGION}
        with mock.patch.dict(os.environ, env):
            code = main(["run", str(spec_path), "--rows", "120", "--run-id", "ops1", "-q"])
        assert code == 0, "the release for the listing tests failed"
        yield {"endpoint": s3.endpoint, "client": client, "spec_path": spec_path, "spec": spec, "env": env,
               "base": base}
