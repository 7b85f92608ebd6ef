"""`tailord produce`: publish images from a source to a topic in tailord's wire format.

One record holds one image, or with `batch` K > 1 a tar of K images (WebDataset style:
`KEY.<ext>` plus `KEY.json` with that image's headers). Headers: `content-type`,
`domain`, `sample-id` (`<domain>/<item key>`, stable across runs), `label` when
known, `probe` = "1" on every `probe_every`-th image.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from kafka import KafkaProducer
from tqdm import tqdm

from streamer.limits import DecodeLimits
from streamer.sources import Item, open_source
from streamer.topics import ensure_topic

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "ppm": "image/x-portable-pixmap",
}
TAR_CONTENT_TYPE = "application/x-tar"
MAX_REQUEST_BYTES = DecodeLimits().max_record_bytes + 64 * 1024


def sample_headers(item: Item, domain: str, probe: bool, with_domain: bool = True) -> dict[str, str]:
    """The per-image headers (without content-type); `with_domain=False` leaves the domain header out
    (a header-less stream; the sample id keeps the source name, which the daemon never reads as a domain)."""
    headers = {"domain": domain} if with_domain else {}
    headers["sample-id"] = f"{domain}/{item.key}"
    if item.label is not None:
        headers["label"] = item.label
    if probe:
        headers["probe"] = "1"
    return headers


def tar_batch(members: list[tuple[Item, dict[str, str]]]) -> bytes:
    """A tar holding each image as `KEY.<ext>` and its headers as `KEY.json`.

    Keys are the position plus the item key reduced to [A-Za-z0-9_-] (WebDataset keys
    end at the first dot), so they are unique, short and safe as member names.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for i, (item, headers) in enumerate(members):
            key = f"{i:05d}_{re.sub(r'[^A-Za-z0-9_-]', '_', item.key)}"[:90]
            for name, data in (
                (f"{key}.{item.fmt_ext}", item.encoded),
                (f"{key}.json", json.dumps(headers).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def record_value(
    members: list[tuple[Item, dict[str, str]]], domain: str | None, as_tar: bool
) -> tuple[bytes, dict[str, str]]:
    """(value, record headers) for one image, or for a tar batch of (usually) several."""
    if not as_tar:
        item, headers = members[0]
        return item.encoded, {"content-type": CONTENT_TYPES.get(item.fmt_ext, ""), **headers}
    return tar_batch(members), {"content-type": TAR_CONTENT_TYPE, **({"domain": domain} if domain else {})}


def _is_probe(index: int, probe_every: int) -> bool:
    return probe_every > 0 and (index + 1) % probe_every == 0


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def produce(
    source: str,
    topic: str,
    bootstrap: str,
    domain: str | None = None,
    limit: int | None = None,
    batch: int = 1,
    client: dict[str, Any] | None = None,
    progress: bool | None = None,
    probe_every: int = 0,
    no_domain: bool = False,
) -> int:
    """Publish up to `limit` images of `source` to `topic`; the number of images sent.

    `source` is `builtin:NAME`, a directory or a .tar (ValueError otherwise); the topic
    is created if missing. The domain defaults to the builtin's or directory's name. A
    progress bar shows on a terminal (or with progress=True). `no_domain` sends no `domain`
    header (experiences then end by count or drift: TAILORD_BOUNDARY). Raises RuntimeError if
    the broker refused a record; everything is flushed before returning.
    """
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    parsed = open_source(source)
    domain = domain or parsed.name
    client = client or {}
    ensure_topic(bootstrap, topic, **client)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        max_request_size=MAX_REQUEST_BYTES,
        linger_ms=20,
        **client,
    )
    failures: list[BaseException] = []  # filled by send callbacks, until the flush
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=limit, unit="img", desc=f"{domain} -> {topic}", disable=not show) as bar:
        try:
            chunks = _chunks(islice(parsed.items, limit), batch)
            sent = _send_chunks(producer, topic, chunks, domain, not no_domain, probe_every, batch > 1,
                                failures, bar)
        finally:
            producer.flush()
            producer.close()
    if failures:
        raise RuntimeError(f"publishing to {topic} on {bootstrap} failed: {failures[0]!r}")
    return sent


def _send_chunks(producer: KafkaProducer, topic: str, chunks: Iterable[list[Item]], domain: str,
                 with_domain: bool, probe_every: int, as_tar: bool, failures: list[BaseException],
                 bar: tqdm) -> int:
    """Send each chunk as one record (a tar batch when `as_tar`), keyed by its first sample id;
    the number of images sent. Stops at the first failure a callback has reported."""
    sent = 0
    for chunk in chunks:
        members = [(item, sample_headers(item, domain, _is_probe(sent + i, probe_every), with_domain))
                   for i, item in enumerate(chunk)]
        value, headers = record_value(members, domain if with_domain else None, as_tar=as_tar)
        future = producer.send(topic, value=value, key=members[0][1]["sample-id"].encode(),
                               headers=[(k, v.encode()) for k, v in headers.items()])
        future.add_errback(failures.append)
        sent += len(chunk)
        bar.update(len(chunk))
        if failures:
            break
    return sent
