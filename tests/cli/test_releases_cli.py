"""`synthfactory releases SPEC`: what has been released, with the gate figures, from the sandbox or a local
`run --out` folder."""

from __future__ import annotations

import json
from unittest import mock

from synthfactory.testing import dev
from synthfactory.cli import main
from synthfactory.errors import EXIT_ERROR, EXIT_OK
from tests.conftest import write_spec


def _manifest(sandbox) -> tuple[str, dict]:
    client, spec = sandbox["client"], sandbox["spec"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=spec.release.bucket,
                                                       Prefix=f"releases/{spec.name}/")["Contents"]]
    (key,) = [k for k in keys if k.endswith("/manifest.json") and "/_" not in k]
    return key.split("/")[2], json.loads(client.get_object(Bucket=spec.release.bucket, Key=key)["Body"].read())


def test_lists_sandbox_releases_with_gate_figures(released_sandbox, capsys):
    version, manifest = _manifest(released_sandbox)
    with mock.patch.dict("os.environ", released_sandbox["env"]):
        assert main(["releases", str(released_sandbox["spec_path"])]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ops_listing: 1 release(s) in s3://synthetic-sandbox/releases/ops_listing/"
    assert out[1].split()[:3] == ["version", "rows", "synthesizer"]
    row = out[2].split()
    assert row[:3] == [version, "120", "cart"]
    assert row[3] == str(manifest["figures"]["quality_score"])
    assert row[-1] == ("yes" if any(f["path"] == "reports/datacard.html" for f in manifest["files"]) else "-")


def test_json_output_carries_the_manifest_figures(released_sandbox, capsys):
    version, manifest = _manifest(released_sandbox)
    with mock.patch.dict("os.environ", released_sandbox["env"]):
        assert main(["releases", str(released_sandbox["spec_path"]), "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    (rel,) = doc["releases"]
    assert rel["version"] == version and rel["rows"] == 120 and rel["approved"] is True
    for k in ("quality_score", "exact_match_rate", "dcr_share", "leak_clean"):
        assert rel["figures"][k] == manifest["figures"][k]


def test_lists_a_local_out_folder(released_sandbox, tmp_path, capsys):
    version, _ = _manifest(released_sandbox)
    spec = released_sandbox["spec"]
    dev.mirror(released_sandbox["client"], spec.release.bucket, f"releases/{spec.name}/{version}",
               tmp_path / "out" / "release" / "releases" / spec.name / version)
    assert main(["releases", str(released_sandbox["spec_path"]), "--out", str(tmp_path / "out")]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ops_listing: 1 release(s) in ") and out[2].split()[:2] == [version, "120"]


def test_no_release_yet_and_unreachable_sandbox(tmp_path, capsys):
    spec = write_spec(tmp_path / "specs", "nothing_yet", tmp_path, tmp_path / "staging")
    assert main(["releases", str(spec), "--out", str(tmp_path / "out")]) == EXIT_OK
    assert capsys.readouterr().out.startswith("nothing_yet: 0 release(s) in ")
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    with mock.patch.dict("os.environ", env):
        assert main(["releases", str(spec)]) == EXIT_ERROR
    assert "error: cannot list releases of nothing_yet" in capsys.readouterr().err
