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


# -- hardening (issue #18, item 5): where staging may live, and keys given twice --------------------------
@pytest.mark.parametrize("uri", ["s3://synthetic-sandbox/staging", "s3://synthetic-sandbox", "s3://synthetic-sandbox/"])
def test_staging_inside_the_release_bucket_is_refused(uri):
    data = _demo()
    data["staging"]["uri"] = uri
    with pytest.raises(SpecError) as info:
        parse_spec(data, origin="bad.yaml")
    msg = str(info.value)
    assert "staging.uri" in msg and "inside the release bucket 'synthetic-sandbox'" in msg, msg
    data["staging"]["uri"] = "s3://phi-staging/synthetic-sandbox"  # another bucket: fine
    assert parse_spec(data).staging.uri == "s3://phi-staging/synthetic-sandbox"


@pytest.mark.parametrize("uri", ["/", "//", "/.", "/tmp/..", "~", "~/", "~root", "$HOME", "/root", "/root/",
                                 "/home/alice", "/home/alice/", "/home", "/Users/bob"])
def test_staging_at_the_filesystem_root_or_a_home_folder_is_refused(uri):
    data = _demo()
    data["staging"]["uri"] = uri
    with pytest.raises(SpecError) as info:
        parse_spec(data, origin="bad.yaml")
    msg = str(info.value)
    assert "staging.uri" in msg and "filesystem root or a home folder" in msg, msg


@pytest.mark.parametrize("uri", [".staging", "/srv/synthfactory/staging", "/home/alice/staging", "~/staging",
                                 "/root/sf", "s3://phi-staging/runs"])
def test_ordinary_staging_folders_are_accepted(uri):
    data = _demo()
    data["staging"]["uri"] = uri
    assert parse_spec(data).staging.uri == uri


def test_duplicate_yaml_key_is_refused_naming_key_and_line(tmp_path):
    text = (ROOT / "include/datasets/cohort_demo.yaml").read_text()
    assert "max_dcr_share: 0.55" in text
    line = text[: text.index("max_dcr_share: 0.55")].count("\n") + 1
    # the measured case: the strict profile's cap given twice, the second one silently weakening it
    path = tmp_path / "cohort_demo.yaml"
    path.write_text(text.replace("max_dcr_share: 0.55,", "max_dcr_share: 0.55, max_dcr_share: 1.0,"))
    plain = yaml.safe_load(path.read_text())  # plain YAML takes the last one without a word
    assert plain["profiles"]["strict"]["privacy"]["max_dcr_share"] == 1.0
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert f"duplicate key 'max_dcr_share' at line {line} (first at line {line})" in msg, msg


def test_duplicate_top_level_key_and_merge_keys(tmp_path):
    from synthfactory.spec import DuplicateKeyError, load_yaml

    with pytest.raises(DuplicateKeyError, match="duplicate key 'name' at line 3 \\(first at line 1\\)"):
        load_yaml("name: a\nowner: b\nname: c\n")
    # a YAML merge key overriding an anchored mapping is not a duplicate
    assert load_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")["other"] == {"x": 3, "y": 2}
