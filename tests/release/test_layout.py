"""The sandbox layout: one object computes every key and URI of a dataset's releases, for every caller
(publisher, readers, CLI, Airflow Asset and lineage, UI page, approval text, plugin macro)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from synthfactory.release.layout import SandboxLayout, check_version, find_version, is_version

V = "v20240101T000000Z"


def _spec(prefix: str, name: str = "cohort_demo", bucket: str = "synthetic-sandbox") -> SimpleNamespace:
    return SimpleNamespace(name=name, release=SimpleNamespace(prefix=prefix, bucket=bucket))


def test_keys_and_uris_for_a_prefix():
    layout = SandboxLayout.for_spec(_spec("releases"))
    assert (layout.prefix, layout.dataset, layout.bucket) == ("releases", "cohort_demo", "synthetic-sandbox")
    assert layout.dataset_prefix == "releases/cohort_demo" and layout.root == "releases/cohort_demo/"
    assert layout.release_prefix(V) == f"releases/cohort_demo/{V}"
    assert layout.version_prefix(V) == f"releases/cohort_demo/{V}/"
    assert layout.version_key(V, "data/patients.parquet") == f"releases/cohort_demo/{V}/data/patients.parquet"
    assert layout.manifest_key(V) == f"releases/cohort_demo/{V}/manifest.json"
    assert layout.latest_key == "releases/cohort_demo/latest.json"
    assert layout.staging_key("run_1", "a.json") == "releases/cohort_demo/_staging/run_1/a.json"
    assert layout.dataset_uri == "s3://synthetic-sandbox/releases/cohort_demo/"
    assert layout.version_uri(V) == f"s3://synthetic-sandbox/releases/cohort_demo/{V}/"
    assert layout.manifest_uri(V) == f"s3://synthetic-sandbox/releases/cohort_demo/{V}/manifest.json"
    assert layout.latest_uri == "s3://synthetic-sandbox/releases/cohort_demo/latest.json"
    assert layout.asset_uri == "s3://synthetic-sandbox/releases/cohort_demo"
    nested = SandboxLayout.of("team/a", "ds", "b")
    assert nested.prefix == "team/a" and nested.version_uri(V) == f"s3://b/team/a/ds/{V}/"


@pytest.mark.parametrize("prefix", ["", "/"])
def test_an_empty_prefix_drops_the_level_everywhere(prefix):
    layout = SandboxLayout.of(prefix, "ds", "b")
    assert (layout.prefix, layout.dataset, layout.root) == ("", "ds", "ds/")
    assert layout.release_prefix(V) == f"ds/{V}" and layout.latest_key == "ds/latest.json"
    assert layout.asset_uri == "s3://b/ds" and layout.dataset_uri == "s3://b/ds/"
    assert layout.version_uri(V) == f"s3://b/ds/{V}/"


def test_one_version_pattern():
    assert is_version(V) and check_version(V) == V
    for bad in ("v1", "v20240101", "v20240101T000000Z/..", "20240101T000000Z", "v20240101T000000Zx"):
        assert not is_version(bad)
        with pytest.raises(ValueError, match="not a release version"):
            check_version(bad)
    assert find_version(f"s3://b/releases/ds/{V}/reports/datacard.html") == V
    assert find_version("/staging/ds/runs/manual__1/reports/datacard.html") is None


def test_the_release_key_prefix_of_a_run_is_the_layout_s(tmp_path):
    from synthfactory import pipeline
    from synthfactory.spec import load_spec
    from tests.conftest import write_spec

    for prefix, expected in (("releases", f"releases/flat/{V}"), ("", f"flat/{V}")):
        spec = load_spec(write_spec(tmp_path, "flat", tmp_path / "x", tmp_path / "s", release__prefix=prefix))
        ctx = pipeline.RunContext(spec=spec, run_id="r", version=V, staging_root=str(tmp_path / "s"))
        assert pipeline.release_key_prefix(ctx) == expected == SandboxLayout.for_spec(spec).release_prefix(V)


def test_readers_over_a_local_release_folder(tmp_path):
    """FolderReader (a ``run --out`` folder) and the publisher's writers read the same layout."""
    from synthfactory.release.sandbox import FolderReader, list_releases, read_latest

    root = tmp_path / "release"
    layout = SandboxLayout.of("releases", "ds")
    (root / layout.version_prefix(V)).mkdir(parents=True)
    (root / layout.manifest_key(V)).write_text(f'{{"version": "{V}"}}')
    (root / layout.version_prefix("v20240102T000000Z")).mkdir()  # no manifest: not a release
    (root / layout.root / "_staging" / "r").mkdir(parents=True)
    reader = FolderReader(root)
    assert list_releases(reader, "releases", "ds") == [V]
    assert read_latest(reader, "releases", "ds") == {"version": V}
    assert FolderReader(tmp_path / "missing").list("releases/ds/") == []
