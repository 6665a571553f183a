"""Fixtures shared by the release tests: the S3 emulator (one per test module) and a bucket emptied around
each test."""

from __future__ import annotations

import pytest

from synthfactory.testing import dev
from tests.release.helpers import reset_bucket


@pytest.fixture(scope="module")
def s3():
    with dev.S3Emulator() as emulator:
        yield emulator


@pytest.fixture
def bucket(s3):
    client = s3.client()
    reset_bucket(client)
    yield client
    reset_bucket(client)
