from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from synthfactory.spec import DatasetSpec, SpecError, discover_specs, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent


def _demo() -> dict:
    return yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())


def test_every_committed_spec_is_valid():
    paths = discover_specs(ROOT / "include/datasets")
    assert paths, "no dataset specs committed"
    for p in paths:
        spec = load_spec(p)
        assert isinstance(spec, DatasetSpec) and spec.name == p.stem


def test_demo_spec_fields():
    spec = load_spec(ROOT / "include/datasets/cohort_demo.yaml")
    assert spec.synthesizer.kind == "cart" and spec.synthesizer.transforms_for("cart") == "ehr"
    assert spec.release.bucket == "synthetic-sandbox" and spec.release.connection_id == "sandbox_s3"
    assert spec.schedule == "@weekly"
    assert spec.profile_names == ["default", "lenient", "strict"]
    q, p = spec.thresholds("strict")
    assert p.max_dcr_share == 0.55 and q == spec.quality
    assert len(spec.spec_hash()) == 64


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (lambda d: d["privacy"].update(max_dcr_share=1.5), "privacy.max_dcr_share", "less than or equal to 1"),
        (lambda d: d["synthesizer"].update(kind="gan9000"), "synthesizer.kind", "Input should be"),
        (lambda d: d["release"].update(bucket="Bad_Bucket"), "release.bucket", "not a valid S3 bucket name"),
        (lambda d: d["release"].pop("bucket"), "release.bucket", "field required"),
        (lambda d: d["features"]["labs"].append({"name": "x1", "loinc": "abc"}), "features.labs.6.loinc",
         "not a LOINC code"),
        (lambda d: d.update(colour="red"), "colour", "unknown field"),
        (lambda d: d.update(schedule="every tuesday"), "schedule", "cron"),
        (lambda d: d["synthesizer"].update(rows=0), "synthesizer.rows", "greater than or equal to 1"),
        (lambda d: d.update(profiles={"default": {}}), "profiles", "reserved"),
    ],
)
def test_bad_spec_names_field_and_problem(mutate, field, problem):
    data = _demo()
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_spec(data, origin="bad.yaml")
    msg = str(info.value)
    assert field in msg and problem in msg, msg


def test_unknown_profile_is_an_error():
    spec = parse_spec(_demo())
    with pytest.raises(SpecError, match="unknown profile 'nope'"):
        spec.thresholds("nope")


def test_file_errors(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(lst)
    other = tmp_path / "other_name.yaml"
    other.write_text(yaml.safe_dump(_demo()))
    with pytest.raises(SpecError, match="must match the file name"):
        load_spec(other)
