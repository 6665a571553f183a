"""The "Synthetic datasets" page as an operator meets it (issue #21, item 7): a spec file that is not UTF-8 is
listed as invalid without breaking the others, spec errors name the file, never the server's path, and the page
reads the sandbox with a reader connection (falling back to the writer with a warning)."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from synthfactory.airflow.webapp import READER_CONN_ID, READER_ENV, create_app
from tests.conftest import write_spec


class _Offline:
    """A client factory that records the connection ids asked for (and reads nothing)."""

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, conn_id):
        self.asked.append(conn_id)
        raise RuntimeError("offline")


@pytest.fixture()
def folder(tmp_path):
    specs = tmp_path / "server" / "secret-layout" / "datasets"
    write_spec(specs, "good_one", tmp_path, tmp_path / "staging")
    write_spec(specs, "bad_value", tmp_path, tmp_path / "staging", privacy__max_dcr_share=7)
    (specs / "binary.yaml").write_bytes(b"\xff\xfe\x00n\x00a\x00m\x00e\x00:\x00 \x00x\x00\x89PNG")
    return specs


def _app(folder, factory, exists=lambda conn_id: False):
    return TestClient(create_app(specs_folder=folder, client_factory=factory, connection_exists=exists,
                                 require_auth=False))


def test_a_non_utf8_spec_is_listed_as_invalid_and_the_others_still_show(folder, monkeypatch):
    monkeypatch.delenv(READER_ENV, raising=False)
    client = _app(folder, _Offline())
    resp = client.get("/api/releases")
    assert resp.status_code == 200
    body = resp.json()
    assert [d["dataset"] for d in body["datasets"]] == ["good_one"]
    assert set(body["spec_errors"]) == {"binary.yaml", "bad_value.yaml"}
    assert "not a UTF-8 text file" in body["spec_errors"]["binary.yaml"]
    page = client.get("/datasets")
    assert page.status_code == 200
    assert "Invalid specs" in page.text and "<code>binary.yaml</code>" in page.text
    assert "privacy.max_dcr_share" in page.text


def test_spec_errors_name_the_file_not_the_server_path(folder, monkeypatch, tmp_path):
    monkeypatch.delenv(READER_ENV, raising=False)
    client = _app(folder, _Offline())
    errors = client.get("/api/releases").json()["spec_errors"]
    for name, err in errors.items():
        assert str(tmp_path) not in err and "secret-layout" not in err, err
        assert err.startswith(f"{name}: "), err
    assert str(tmp_path) not in client.get("/datasets").text.replace(str(tmp_path / "staging"), "")


def test_reader_connection_from_the_environment(folder, monkeypatch):
    monkeypatch.setenv(READER_ENV, "my_reader")
    factory = _Offline()
    _app(folder, factory).get("/api/releases")
    assert factory.asked == ["my_reader"]


def test_reader_connection_by_its_documented_id(folder, monkeypatch):
    monkeypatch.delenv(READER_ENV, raising=False)
    factory = _Offline()
    body = _app(folder, factory, exists=lambda c: c == READER_CONN_ID).get("/api/releases").json()
    assert factory.asked == [READER_CONN_ID] and body["datasets"][0]["connection_id"] == READER_CONN_ID


def test_no_reader_falls_back_to_the_writer_with_a_warning(folder, monkeypatch, caplog):
    monkeypatch.delenv(READER_ENV, raising=False)
    factory = _Offline()
    client = _app(folder, factory)
    with caplog.at_level(logging.WARNING, logger="synthfactory.airflow.webapp"):
        client.get("/api/releases")
        client.get("/api/releases")
    assert factory.asked == ["sandbox_s3", "sandbox_s3"]
    warnings = [r.getMessage() for r in caplog.records if "no sandbox reader connection" in r.getMessage()]
    assert len(warnings) == 1 and READER_ENV in warnings[0] and "'sandbox_s3'" in warnings[0]


def test_the_reader_lookup_uses_airflow_connections(monkeypatch):
    from synthfactory.airflow.webapp import airflow_connection_exists

    monkeypatch.setenv("AIRFLOW_CONN_SANDBOX_S3_READER", '{"conn_type": "aws", "login": "reader-key", '
                                                         '"password": "reader-secret"}')
    assert airflow_connection_exists(READER_CONN_ID)
    assert not airflow_connection_exists("no_such_connection_anywhere")
