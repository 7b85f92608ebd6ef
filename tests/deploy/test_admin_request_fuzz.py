"""Fuzz of the admin API's snapshot request parsing: any body gives a request or a 4xx SnapshotError.

The parser is the one part of `POST /admin/snapshots` that reads attacker-controlled bytes
before anything is authorised to cost time or memory; a crash there would be a 500 with a
traceback. Hypothesis drives raw bytes, well-formed multipart bodies with hostile fields and
JSON bodies with hostile values through `deploy.snapshot_request.parse_request`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.http_api import error_status
from deploy.snapshot_errors import SnapshotError
from deploy.snapshot_request import SnapshotRequest, parse_request

BOUNDARY = "fuzzboundary7MA4YWxkTrZu0gW"
FIELDS = ("images", "labels", "strategy", "budget", "name", "other", "")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def parse_or_4xx(targets_dir: Path | None, content_type: str, body: bytes) -> None:
    try:
        request = parse_request(content_type, body, targets_dir)
    except SnapshotError as exc:
        assert 400 <= error_status(exc) < 500, (error_status(exc), str(exc))
        assert len(str(exc)) < 400  # one readable line, never an echo of the whole body
        return
    assert isinstance(request, SnapshotRequest)


def multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        chunks.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters='"\r\n'), max_size=40)


@FUZZ
@given(content_type=st.sampled_from(["multipart/form-data; boundary=x", "application/json", "text/plain", "",
                                      "multipart/form-data", "application/JSON; charset=utf-8"]),
       body=st.binary(max_size=2048))
def test_any_bytes_give_a_request_or_a_4xx(content_type, body):
    parse_or_4xx(None, content_type, body)


@FUZZ
@given(parts=st.lists(st.tuples(st.sampled_from(FIELDS), st.none() | text,
                                st.binary(max_size=256) | text.map(str.encode)), max_size=6))
def test_multipart_with_hostile_fields_gives_a_request_or_a_4xx(parts):
    parse_or_4xx(None, f"multipart/form-data; boundary={BOUNDARY}", multipart(parts))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text | st.just("task"),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=8)


@FUZZ
@given(request=st.dictionaries(st.sampled_from(["target_path", "labels_path", "strategy", "budget", "name"]) | text,
                               json_values, max_size=5))
def test_json_with_hostile_values_gives_a_request_or_a_4xx(request, tmp_path_factory):
    targets = tmp_path_factory.mktemp("targets")
    (targets / "task").mkdir()
    parse_or_4xx(targets, "application/json", json.dumps(request).encode())
