"""The spec's release section: defaults, encryption settings, and the sandbox writer's own connection."""

from __future__ import annotations

import pytest
import yaml

from synthfactory.spec import SpecError, parse_spec
from tests.conftest import ROOT


def _demo(**release):
    data = yaml.safe_load((ROOT / "include/datasets/cohort_demo.yaml").read_text())
    data["release"].update(release)
    return data


def test_release_defaults():
    r = parse_spec(_demo()).release
    assert (r.encryption, r.kms_key_id, r.keep_versions, r.require_approval) == ("AES256", None, 10, False)
    assert r.approval_timeout_hours == 72 and r.max_attempts >= 3 and r.multipart_threshold_mb >= 5
    assert parse_spec(_demo(encryption="aws:kms", kms_key_id="alias/sandbox")).release.kms_key_id == "alias/sandbox"


@pytest.mark.parametrize("release, message", [
    ({"encryption": "aws:kms"}, "release: Value error, kms_key_id: required when encryption is aws:kms"),
    ({"kms_key_id": "alias/x"}, "kms_key_id: only used with encryption aws:kms"),
    ({"encryption": "none"}, "release.encryption: Input should be 'AES256' or 'aws:kms'"),
    ({"keep_versions": 0}, "release.keep_versions: Input should be greater than or equal to 1"),
    ({"approval_timeout_hours": 0}, "release.approval_timeout_hours: Input should be greater than 0"),
    ({"multipart_chunksize_mb": 1}, "release.multipart_chunksize_mb: Input should be greater than or equal to 5"),
    ({"acl": "public-read"}, "release.acl: unknown field"),
])
def test_bad_release_settings_name_the_field(release, message):
    with pytest.raises(SpecError) as err:
        parse_spec(_demo(**release))
    assert message in str(err.value)


@pytest.mark.parametrize("side", ["source", "staging"])
def test_sandbox_writer_connection_must_differ_from_the_phi_side(side):
    data = _demo(connection_id="shared_aws")
    data[side]["connection_id"] = "shared_aws"
    with pytest.raises(SpecError, match=f"release.connection_id: 'shared_aws' is also {side}.connection_id"):
        parse_spec(data)
    data[side]["connection_id"] = "phi_aws"
    assert parse_spec(data).release.connection_id == "shared_aws"
