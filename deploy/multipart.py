"""`multipart/form-data` (RFC 7578) in and out, for snapshot uploads.

The admin API receives target images as a multipart body that is already fully in
memory (the HTTP server caps its size), so parsing is a split on the boundary plus
the stdlib `email` header parser for each part's headers. Part contents are kept
byte for byte: images are binary and may contain CR, LF or `--` anywhere.
`encode_form_data` builds the same format for the `tailord snapshot` client.
"""

from __future__ import annotations

import email.message
import uuid
from dataclasses import dataclass
from email.parser import HeaderParser

MAX_PARTS = 10_000


class MultipartError(ValueError):
    """A body that is not well-formed `multipart/form-data`; `str()` says why in one line."""


@dataclass(frozen=True)
class FormPart:
    """One form field: its name, the uploaded file name (None for a plain field) and bytes."""

    name: str
    filename: str | None
    content: bytes

    def text(self) -> str:
        """The content of a plain field as text."""
        return self.content.decode("utf-8", "replace").strip()


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a `multipart/form-data` content type."""
    header = email.message.Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {content_type!r}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise MultipartError("multipart/form-data without a valid boundary")
    return boundary


def parse_form_data(content_type: str, body: bytes) -> list[FormPart]:
    """Split a `multipart/form-data` body into its parts, in order."""
    delimiter = b"\r\n--" + boundary_of(content_type).encode()
    sections = (b"\r\n" + body).split(delimiter)
    parts: list[FormPart] = []
    for section in sections[1:]:  # sections[0] is the preamble
        if section.startswith(b"--"):
            return parts
        if len(parts) >= MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts")
        head, sep, content = section.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError(f"part {len(parts) + 1} has no blank line after its headers")
        # Browsers send non-ASCII file names as raw UTF-8 inside the quotes (RFC 7578 4.2).
        text = head.lstrip(b" \t").removeprefix(b"\r\n").decode("utf-8", "replace")
        headers = HeaderParser().parsestr(text + "\r\n")
        name = headers.get_param("name", header="content-disposition")
        if headers.get_content_disposition() != "form-data" or not isinstance(name, str):
            raise MultipartError(f"part {len(parts) + 1} is not a named form-data part")
        parts.append(FormPart(name, headers.get_filename(), content))
    raise MultipartError("body ends before the closing boundary")


def _disposition(name: str, filename: str | None) -> str:
    def clean(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")

    header = f'form-data; name="{clean(name)}"'
    return header if filename is None else f'{header}; filename="{clean(filename)}"'


def encode_form_data(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[str, bytes]:
    """(content type, body) for plain `fields` and `files` given as (field, filename, bytes)."""
    items = [(name, None, value.encode()) for name, value in fields.items()]
    items += [(name, filename, data) for name, filename, data in files]
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in data for _, _, data in items):
        boundary = uuid.uuid4().hex
    chunks = []
    for name, filename, data in items:
        kind = "application/octet-stream" if filename is not None else "text/plain; charset=utf-8"
        chunks += [f"--{boundary}\r\nContent-Disposition: {_disposition(name, filename)}\r\n"
                   f"Content-Type: {kind}\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)
