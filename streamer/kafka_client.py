"""Security options shared by every Kafka client (consumer, producer, admin).

tailord's settings name the options exactly like kafka-python's keyword arguments, so
the mapping only selects them, validates the enumerations and drops unset ones; secrets
given as pydantic `SecretStr` are unwrapped here, and `redact` hides them again for logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SECURITY_KEYS = (
    "security_protocol",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
)
SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password"})
PROTOCOLS = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
SASL_MECHANISMS = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"})


def _plain(value: Any) -> Any:
    """Unwrap a pydantic SecretStr (or anything with get_secret_value)."""
    getter = getattr(value, "get_secret_value", None)
    return getter() if callable(getter) else value


def client_config(security: Mapping[str, Any]) -> dict[str, Any]:
    """kafka-python keyword arguments for the security settings in `security`.

    Keys other than SECURITY_KEYS are ignored (callers may pass all their settings);
    None values are dropped so kafka-python's defaults apply. Raises ValueError naming
    the bad setting for an unknown protocol or mechanism, or SASL without a SASL protocol.
    """
    config = {key: _plain(security[key]) for key in SECURITY_KEYS if security.get(key) is not None}
    protocol = str(config.get("security_protocol", "PLAINTEXT")).upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"security_protocol={protocol!r}: expected one of {sorted(PROTOCOLS)}")
    if "security_protocol" in config:
        config["security_protocol"] = protocol
    mechanism = config.get("sasl_mechanism")
    if mechanism is not None:
        mechanism = config["sasl_mechanism"] = str(mechanism).upper()
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(
                f"sasl_mechanism={mechanism!r}: expected one of {sorted(SASL_MECHANISMS)}"
            )
        if not protocol.startswith("SASL_"):
            raise ValueError(
                f"sasl_mechanism is set but security_protocol={protocol!r}; "
                "use SASL_PLAINTEXT or SASL_SSL"
            )
    return config


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` safe to log: secret values replaced by '***'."""
    return {
        key: "***" if key in SECRET_KEYS and value is not None else value
        for key, value in config.items()
    }
