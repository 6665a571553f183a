"""The `synthfactory` command as an operator meets it (issue #21, item 6): plain-text help with every argument
explained, --version, a lost S3 connection mid-publish as "publish failed: … (re-run to resume)" (exit 1), and
clear "invalid spec:" refusals (exit 2) of a binary file and a YAML alias bomb."""

from __future__ import annotations

import re
from unittest import mock

import pytest

from synthfactory import __version__
from synthfactory.cli import main
from synthfactory.errors import EXIT_ERROR, EXIT_OK, EXIT_SPEC
from synthfactory.testing import dev
from tests.conftest import write_spec


@pytest.mark.parametrize("argv", [[], ["run"], ["validate"], ["releases"], ["freeze-suite"]])
def test_help_is_plain_text_and_explains_every_argument(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "`" not in out, out  # no RST/Markdown markup
    if argv:
        assert re.search(r"^  spec\s+the dataset spec, a YAML file", out, re.M), out
    if argv == ["run"]:
        flat = " ".join(out.split())
        assert "a profile named in the spec's profiles, or default" in flat


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"synthfactory {__version__}"


def test_losing_s3_mid_publish_says_rerun_to_resume(tmp_path, capsys, monkeypatch):
    """The first write reaches the sandbox, then S3 goes away: one line, exit 1, no botocore traceback."""
    from synthfactory import pipeline

    bucket = "sf-cli-lost-s3"
    emulator = dev.S3Emulator()
    endpoint = emulator.start()
    emulator.client().create_bucket(Bucket=bucket)
    spec = write_spec(tmp_path / "specs", "cli_lost_s3", tmp_path / "extract", tmp_path / "staging",
                      release__bucket=bucket, release__max_attempts=2)
    written = []

    def run_all(ctx, writer):
        writer.put("releases/cli_lost_s3/_staging/a", b"first part")
        written.append(writer.head("releases/cli_lost_s3/_staging/a"))
        emulator.stop()  # S3 goes away mid-publish
        writer.put("releases/cli_lost_s3/_staging/b", b"second part")
        raise AssertionError("unreachable")

    monkeypatch.setattr(pipeline, "run_all", run_all)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": dev.REGION}
    with mock.patch.dict("os.environ", env):
        code = main(["run", str(spec), "-q", "--run-id", "r1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert written and written[0] is not None
    assert code == EXIT_ERROR
    assert err[-1].startswith("publish failed: EndpointConnectionError: ") and err[-1].endswith("(re-run to resume)")
    assert "Traceback" not in "\n".join(err)


def test_connection_errors_of_the_writer_become_transient():
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    from synthfactory.cli import PublishInterrupted, _ResumableWriter
    from synthfactory.errors import TransientError

    class Inner:
        bucket = "b"

        def put(self, key, data):
            raise EndpointConnectionError(endpoint_url="http://minio:9000")

        def get(self, key):
            raise ConnectionClosedError(endpoint_url="http://minio:9000")

        def head(self, key):
            raise KeyError(key)  # anything else passes through unchanged

    w = _ResumableWriter(Inner())
    assert w.bucket == "b"
    for call in (lambda: w.put("k", b""), lambda: w.get("k")):
        with pytest.raises(PublishInterrupted) as exc:
            call()
        assert isinstance(exc.value, TransientError) and str(exc.value).endswith("(re-run to resume)")
    with pytest.raises(KeyError):
        w.head("k")


def test_validate_a_binary_file_is_an_invalid_spec(tmp_path, capsys):
    path = tmp_path / "binary_spec.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    assert main(["validate", str(path)]) == EXIT_SPEC
    err = capsys.readouterr().err
    assert err.startswith("invalid spec: ") and "not a UTF-8 text file" in err and "Traceback" not in err


def _bomb(levels: int = 9) -> str:
    lines = ['    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines)


def test_validate_refuses_a_yaml_alias_bomb_in_synthesizer_params(tmp_path, capsys):
    path = write_spec(tmp_path, "alias_bomb", tmp_path / "extract", tmp_path / "staging")
    text = path.read_text()
    assert "\n  params: {}\n" in text
    path.write_text(text.replace("\n  params: {}\n", "\n  params:\n" + _bomb() + "\n", 1))
    assert main(["validate", str(path)]) == EXIT_SPEC
    err = capsys.readouterr().err
    assert err.startswith("invalid spec: ") and "YAML aliases expand to more than" in err, err


def test_validate_refuses_many_aliases_and_a_recursive_one(tmp_path, capsys):
    path = write_spec(tmp_path, "alias_many", tmp_path / "extract", tmp_path / "staging")
    text = path.read_text()
    path.write_text(text.replace("\n  params: {}\n", "\n  params: {a: &a 1, b: [" + ", ".join(["*a"] * 101)
                                 + "]}\n", 1))
    assert main(["validate", str(path)]) == EXIT_SPEC
    assert "more than 100 YAML aliases" in capsys.readouterr().err
    path.write_text(text.replace("\n  params: {}\n", "\n  params: &p {a: *p}\n", 1))
    assert main(["validate", str(path)]) == EXIT_SPEC
    assert "a YAML alias inside its own anchor" in capsys.readouterr().err


def test_a_few_aliases_still_load(tmp_path, capsys):
    path = write_spec(tmp_path, "alias_ok", tmp_path / "extract", tmp_path / "staging")
    text = path.read_text()
    assert "\n  seed: 42\n" in text and "\n    min_values: 50\n" in text
    path.write_text(text.replace("\n  seed: 42\n", "\n  seed: &s 42\n", 1)
                    .replace("\n    min_values: 50\n", "\n    min_values: *s\n", 1))
    assert main(["validate", str(path)]) == EXIT_OK, capsys.readouterr().err
