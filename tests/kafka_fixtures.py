"""A real embedded broker for tests: `start_broker()` and the session-scoped `broker` fixture.

Import the fixture into a conftest (`from tests.kafka_fixtures import broker`); tests
then get a running `EmbeddedBroker` and use fresh topic names (`unique_topic`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from streamer.broker import EmbeddedBroker

_topic_ids = itertools.count()


@contextmanager
def start_broker() -> Iterator[EmbeddedBroker]:
    """An embedded broker on a free port, stopped on exit."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded broker shared by the whole test session."""
    with start_broker() as running:
        yield running


def unique_topic(prefix: str = "t") -> str:
    """A topic name no other test (or earlier run on a reused broker) has used."""
    return f"{prefix}-{os.getpid()}-{next(_topic_ids)}"
