"""`POST /admin/snapshots` bodies: parsed into a `SnapshotRequest`, then built by the engine.

Two kinds of body: an upload (`multipart/form-data`: `images` files, a `labels` CSV,
`strategy`, `budget`, `name` fields) or JSON naming a folder under TAILORD_TARGETS_DIR
(`target_path`, `labels_path`, `strategy`, `budget`, `name`), read with bounded reads that
never leave that folder. Every malformed body is a `BadRequest` (or `UnsupportedBody`),
mapped to an HTTP status by `deploy.http_api`. `create_from_request` is the backend's entry
point: parse, build (`deploy.snapshots.SnapshotEngine.create`), count the outcome.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.multipart import MultipartError, parse_form_data
from deploy.snapshot_errors import BadRequest, SnapshotError, Unavailable, UnsupportedBody
from deploy.snapshots import (
    DEFAULT_STRATEGY,
    MAX_TARGETS,
    SnapshotEngine,
    parse_budget,
    parse_epochs,
    parse_strategy,
)
from streamer.decode import sniff_format
from streamer.limits import DecodeLimits

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm",
                            ".gif"})
TARGETS_MAX_BYTES = 512 << 20  # encoded target images read for one JSON (target_path) request
LABELS_MAX_BYTES = 16 << 20  # a labels CSV
OPTION_FIELDS = ("strategy", "budget", "epochs", "name")  # a request's options, in a form and in JSON alike
JSON_KEYS = frozenset({"target_path", "labels_path", *OPTION_FIELDS})


@dataclass(frozen=True)
class SnapshotRequest:
    """A parsed `POST /admin/snapshots` body."""

    targets: list[tuple[str, bytes]]
    labels: dict[str, str] | None
    strategy: str
    budget: int | None
    epochs: int
    name: str | None


def create_from_request(engine: SnapshotEngine, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """`POST /admin/snapshots`: parse, build, count the outcome in the engine's metrics; (201, manifest)."""
    started = time.perf_counter()
    strategy = "invalid"
    try:
        request = parse_request(content_type, body, engine.targets_dir, engine.limits.max_record_bytes)
        strategy = request.strategy
        manifest = engine.create(request.targets, request.labels, request.strategy, request.budget, request.name,
                                 request.epochs)
    except Exception as exc:
        _count(engine, strategy, "rejected" if isinstance(exc, SnapshotError)
               and not isinstance(exc, Unavailable) else "failed")
        raise
    _count(engine, strategy, "ok")
    if engine.metrics is not None:
        engine.metrics.snapshot_seconds.observe(time.perf_counter() - started)
    return 201, manifest


def _count(engine: SnapshotEngine, strategy: str, outcome: str) -> None:
    if engine.metrics is not None:
        engine.metrics.snapshot_requests.labels(strategy, outcome).inc()


def parse_request(content_type: str, body: bytes, targets_dir: Path | None = None,
                  max_image_bytes: int = DecodeLimits().max_record_bytes) -> SnapshotRequest:
    """A multipart upload, or a JSON body naming a folder under `targets_dir` (images read up to
    `max_image_bytes` each)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return _parse_multipart(content_type, body)
    if kind == "application/json":
        return _parse_json(body, targets_dir, max_image_bytes)
    raise UnsupportedBody("send multipart/form-data (images) or application/json (target_path)")


def _parse_multipart(content_type: str, body: bytes) -> SnapshotRequest:
    try:
        parts = parse_form_data(content_type, body)
    except MultipartError as exc:
        raise BadRequest(f"bad multipart body: {exc}") from None
    targets: list[tuple[str, bytes]] = []
    labels = None
    fields: dict[str, str] = {}
    for part in parts:
        if part.name == "images":
            filename = (part.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
            targets.append((filename or f"image-{len(targets) + 1}", part.content))
        elif part.name == "labels":
            labels = parse_labels_csv(part.content.decode("utf-8-sig", "replace"))
        elif part.name in OPTION_FIELDS:
            fields[part.name] = part.text()
        else:
            known = ", ".join(("images", "labels", *OPTION_FIELDS))
            raise BadRequest(f"unknown form field {part.name[:40]!r}: use {known}")
    return SnapshotRequest(targets, labels, *_sept_options(fields), fields.get("name") or None)


def _parse_json(body: bytes, targets_dir: Path | None, max_image_bytes: int) -> SnapshotRequest:
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"bad JSON body: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("target_path"), str):
        raise BadRequest('JSON body needs "target_path" (a folder under TAILORD_TARGETS_DIR)')
    unknown = sorted(set(request) - JSON_KEYS)
    if unknown:
        raise BadRequest(f"unknown key {unknown[0][:40]!r}")
    name = request.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest("name must be a string")
    options = _sept_options(request)  # every field checked before a target is read
    targets = _read_targets(request["target_path"], targets_dir, max_image_bytes)
    labels = None
    if request.get("labels_path") is not None:
        labels_file = _inside_targets(str(request["labels_path"]), targets_dir)
        if not labels_file.is_file():
            raise BadRequest("labels_path is not a file")
        text = read_bounded(labels_file, LABELS_MAX_BYTES, "labels file").decode("utf-8-sig", errors="replace")
        labels = parse_labels_csv(text)
    return SnapshotRequest(targets, labels, *options, name)


def _sept_options(fields: dict[str, Any]) -> tuple[str, int | None, int]:
    """The request's strategy, SEPT budget and epochs, checked (BadRequest names a bad one)."""
    return (parse_strategy(fields.get("strategy", DEFAULT_STRATEGY)), parse_budget(fields.get("budget")),
            parse_epochs(fields.get("epochs")))


def _read_targets(target_path: str, targets_dir: Path | None, max_image_bytes: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of the images in folder `target_path` under `targets_dir`, bounded each and in all."""
    folder = _inside_targets(target_path, targets_dir)
    if not folder.is_dir():
        raise BadRequest("target_path is not a folder")
    files = collect_images(folder, base=targets_dir)
    if len(files) > MAX_TARGETS:
        raise BadRequest(f"{len(files)} target images; at most {MAX_TARGETS}")
    targets, total = [], 0
    for path in files:
        data = read_bounded(_inside_targets(str(path), targets_dir), max_image_bytes, "target")
        total += len(data)
        if total > TARGETS_MAX_BYTES:
            raise BadRequest(f"target images over {TARGETS_MAX_BYTES} bytes in all")
        targets.append((path.name, data))
    return targets


def _inside_targets(value: str, targets_dir: Path | None) -> Path:
    """`value` resolved (symlinks included) relative to TAILORD_TARGETS_DIR; BadRequest if outside it."""
    if targets_dir is None:
        raise BadRequest("path targets need TAILORD_TARGETS_DIR set on the daemon; "
                         "upload the images as multipart/form-data instead")
    base = targets_dir.resolve()
    path = (base / value).resolve()
    if not path.is_relative_to(base):
        raise BadRequest("target paths must stay inside TAILORD_TARGETS_DIR")
    return path


def collect_images(folder: Path, base: Path | None = None) -> list[Path]:
    """Image files directly in `folder` (by suffix or magic bytes), sorted; hidden files skipped.

    With `base`, an entry whose real path (symlinks resolved) leaves `base` is skipped before
    it is opened.
    """
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if base is not None and not path.resolve().is_relative_to(base.resolve()):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
            continue
        with open(path, "rb") as fh:
            fmt = sniff_format(fh.read(512))
        if fmt not in (None, "tar"):
            found.append(path)
    return found


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file `path` (never through a symlink), BadRequest past `limit`.

    The size is checked on the opened file, so a file swapped in after a check cannot
    be larger than what was checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadRequest(f"{what} {path.name!r} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if os.fstat(fh.fileno()).st_size > limit:
            raise BadRequest(f"{what} {path.name!r} is over {limit} bytes")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BadRequest(f"{what} {path.name!r} is over {limit} bytes")
    return data


def parse_labels_csv(text: str) -> dict[str, str]:
    """`filename,label` rows (an optional `filename,label` header; blank rows skipped).

    A malformed CSV (e.g. a field over the csv module's 128 KiB limit) is BadRequest.
    """
    try:
        return _labels_from_rows(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise BadRequest(f"labels CSV is malformed: {exc}") from None


def _labels_from_rows(rows: Iterable[list[str]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise BadRequest(f"labels CSV row {number}: expected filename,label, got {len(row)} columns")
        filename, label = row[0].strip(), row[1].strip()
        if number == 1 and (filename.lower(), label.lower()) == ("filename", "label"):
            continue
        if not filename or not label:
            raise BadRequest(f"labels CSV row {number}: empty filename or label")
        labels[filename] = label
    return labels
