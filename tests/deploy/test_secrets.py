"""Secrets (the SASL password, the admin token) reach the code that needs them and nothing else.

SASL cannot be exercised against the embedded broker (tansu has no SASL), so this checks the
path from the TAILORD_KAFKA_* settings to kafka-python's keyword arguments, and that log
lines, settings dumps and `redact` never show a secret. /admin/status is checked against a
running daemon in tests/e2e/test_admin_surface.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from deploy.logs import configure_logging
from deploy.settings import kafka_security, load_settings
from streamer.kafka_client import client_config, redact

PASSWORD = "sasl-pw-7f3a9c"
TOKEN = "admin-token-c41d2e"


@pytest.fixture
def sasl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """TAILORD_* variables for SASL_SSL with SCRAM, plus an admin token."""
    for name, value in {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                        "KAFKA_SASL_USERNAME": "svc-tailord", "KAFKA_SASL_PASSWORD": PASSWORD,
                        "KAFKA_SSL_CAFILE": "/etc/ssl/certs/ca-certificates.crt",
                        "ADMIN_TOKEN": TOKEN}.items():
        monkeypatch.setenv(f"TAILORD_{name}", value)


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """Put back the structlog configuration a test replaces."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_sasl_settings_reach_every_kafka_client(sasl_env: None) -> None:
    config = client_config(kafka_security(load_settings()))
    assert config == {"security_protocol": "SASL_SSL", "ssl_cafile": "/etc/ssl/certs/ca-certificates.crt",
                      "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc-tailord",
                      "sasl_plain_password": PASSWORD}
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(config) <= set(client.DEFAULT_CONFIG), f"{client.__name__} does not take {set(config)}"


def test_redact_hides_the_password(sasl_env: None) -> None:
    shown = redact(client_config(kafka_security(load_settings())))
    assert shown["sasl_plain_password"] == "***"
    assert shown["sasl_plain_username"] == "svc-tailord"
    assert PASSWORD not in repr(shown)


def test_settings_dumps_hide_secrets(sasl_env: None) -> None:
    settings = load_settings()
    assert settings.kafka_sasl_password.get_secret_value() == PASSWORD
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump())):
        assert PASSWORD not in text and TOKEN not in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_lines_never_hold_secrets(fmt: str, sasl_env: None, restore_structlog: None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt, "debug")
    log = structlog.get_logger()
    settings = load_settings()
    config = client_config(kafka_security(settings))
    log.info("kafka_client", sasl_plain_password=PASSWORD, admin_token=TOKEN, bootstrap="b:9092")
    log.warning("settings", password=PASSWORD, ADMIN_TOKEN=TOKEN, client_secret=PASSWORD)
    log.info("client_config", config=config, clients=[config])
    log.info("settings_object", settings=settings, token=settings.admin_token)
    out = capsys.readouterr().err
    assert "kafka_client" in out and "client_config" in out and "b:9092" in out
    assert "svc-tailord" in out  # the user name is not a secret
    assert PASSWORD not in out and TOKEN not in out
