"""The indexer: a background thread owning the sample store and the FAISS index of the daemon.

The training loop hands every trained batch (and every probe sample) to `Indexer.submit`;
the thread writes the encoded bytes to the `SampleStore` and, once an encoder exists,
embeds the new non-probe samples and adds them to the live `VectorIndex`. After each
experience checkpoint, `Indexer.new_encoder` makes the thread load that checkpoint's
backbone (a frozen copy read from disk, never the live training model), re-embed every
stored non-probe sample, build a new index version to the side and swap it in. The
encoder version is the experience number of its checkpoint.

Everything runs on one worker thread, so the encoder and the live index version always
agree; during a re-embed the thread keeps storing (and indexing, with the old encoder)
new batches between its own batches, so training never waits for a refresh.

Also here, shared with the snapshot engine: finding experience checkpoints, loading an
encoder from one, and decoding stored bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import structlog
import torch
from safetensors.torch import load_file
from torch import nn

from deploy.checkpoints import MANIFEST
from deploy.index_budget import POLL_S, ComputeBudget, Upkeep
from learners.augment import EvalTransform
from learners.evaluation import embed
from learners.snapshot import backbone_from_spec
from replay.catalog import SampleRow
from replay.index import VectorIndex
from replay.index_options import IndexOptions
from replay.store import SampleStore
from safefiles.files import sha256_file
from streamer.decode import decode_image
from streamer.limits import DecodeLimits
from streamer.records import RejectedRecord

log = structlog.get_logger()

EXPERIENCE_DIR = re.compile(r"^exp-(\d{6})$")
LOCK_FILE = ".store.lock"
EMBED_BATCH = 256  # stored samples decoded and embedded at a time during a refresh
MAX_PENDING = 64  # submitted batches waiting before `submit` blocks (the thread is badly behind)
MAX_UNINDEXED = 200_000  # queued sample ids; older ones wait for the next refresh instead


# ---- helpers shared with the snapshot engine

def experience_checkpoints(checkpoint_root: Path) -> dict[int, Path]:
    """End-of-experience checkpoint folders by experience number (mid-experience ones excluded)."""
    found: dict[int, Path] = {}
    if not checkpoint_root.is_dir():
        return found
    for path in checkpoint_root.iterdir():
        match = EXPERIENCE_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("kind") == "experience":
            found[int(match.group(1))] = path
    return found


def read_checkpoint(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The SSL method's weights of a checkpoint and its manifest.

    `model.safetensors` is checked against the manifest's sha256 first: a torn file is refused.
    """
    manifest = json.loads((checkpoint_dir / MANIFEST).read_text())
    weights = checkpoint_dir / "model.safetensors"
    expected = manifest.get("files", {}).get("model.safetensors")
    if expected is not None and sha256_file(weights) != expected:
        raise ValueError(f"{weights}: sha256 does not match its manifest")
    return load_file(str(weights)), manifest


def backbone_from_checkpoint(checkpoint_dir: Path, device: torch.device | str, *,
                             meta: bool = False) -> tuple[nn.Module, dict]:
    """The backbone of a checkpoint (the `backbone.*` weights) in eval mode on `device`, and the manifest.

    `meta`: built without weight init, so no draw from the global RNG (`backbone_from_spec`); the
    snapshot engine's HTTP threads and the indexer's thread load checkpoints this way beside training.
    """
    state, manifest = read_checkpoint(checkpoint_dir)
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return backbone_from_spec(manifest["backbone"], weights, meta=meta).to(device), manifest


@dataclass
class Encoder:
    """A frozen backbone of one checkpoint and its evaluation transform."""

    version: int
    backbone: nn.Module
    transform: EvalTransform
    manifest: dict

    @classmethod
    def load(cls, version: int, checkpoint_dir: Path, device: torch.device | str, *,
             meta: bool = False) -> Encoder:
        """The frozen encoder of a checkpoint (`meta`: see `backbone_from_checkpoint`)."""
        backbone, manifest = backbone_from_checkpoint(checkpoint_dir, device, meta=meta)
        backbone.requires_grad_(False)
        spec = manifest["input"]
        transform = EvalTransform(spec["resolution"], spec["mean"], spec["std"]).to(device)
        return cls(version, backbone, transform, manifest)

    def __call__(self, images_u8: torch.Tensor) -> np.ndarray:
        """(N,3,S,S) uint8 -> (N,D) float32 unit-norm features."""
        return embed(self.backbone, images_u8, self.transform).numpy()


def decode_images(encoded: list[bytes], size: int, limits: DecodeLimits) -> tuple[torch.Tensor, list[int]]:
    """Decode encoded images to (M,3,size,size) uint8; also returns which inputs decoded (indices)."""
    images, kept = [], []
    for i, data in enumerate(encoded):
        try:
            images.append(decode_image(data, limits, size))
        except RejectedRecord:
            continue
        kept.append(i)
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), kept
    return torch.stack(images), kept


def private_dir(path: Path) -> None:
    """Create `path` owner-only (0700), or make it so when it exists and is ours.

    The state dir holds the stream's images, labels, trained ids and snapshots: under the
    usual umask 022 all of it would be world-readable. A folder of another user is left as is.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        path.chmod(stat.S_IMODE(info.st_mode) & 0o700)


def lock_state(state_dir: Path) -> int:
    """Take the exclusive lock on the state dir's sample store; returns the fd that holds it.

    The daemon's indexer holds it while running, so an offline snapshot cannot open (and
    crash-recover) the store under a live daemon. Raises `BlockingIOError` when held.
    The state dir is made owner-only first (the daemon's indexer takes the lock before any
    sample, label, checkpoint or trained id is written).
    """
    private_dir(state_dir)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


# ---- the indexer

@dataclass(frozen=True)
class _Batch:
    sample_ids: list[str]
    encoded: list[bytes]
    experience: int
    domains: list[str]
    labels: list[str | None] | None
    probes: list[bool]


@dataclass(frozen=True)
class _Handover:
    """An experience's tail filed under the next one (a drift boundary's samples after its change point)."""

    experience: int
    to: int
    trained: int  # the experience's last non-probe samples to move (the probes among them go too)


@dataclass
class _Rebuild:
    """A re-embedding of the store with a new encoder, done chunk by chunk within the budget."""

    encoder: Encoder
    pages: Iterator[tuple[list[SampleRow], list[bytes]]]  # the store's non-probe records, keyset-paged
    total: int  # non-probe samples stored when it started (progress only)
    until: int  # the store's last rowid when it started: the rows it re-embeds
    started: float
    done: int = 0
    vectors: list[np.ndarray] = field(default_factory=list)  # (n_i, D) each
    ids: list[str] = field(default_factory=list)
    experiences: list[int] = field(default_factory=list)
    evicted: set[str] = field(default_factory=set)  # dropped by the store since it started


class Indexer:
    """Background thread keeping the sample store and the FAISS index up to date, within a
    compute budget (docs/design.md, "Index upkeep").

    Store writes are done at once; embedding runs in chunks of `EMBED_BATCH` only while
    `budget.allows()`: new samples into the live index (newest first), and, after a new
    experience checkpoint, a rolling re-embedding of the whole store built to the side and
    swapped in when complete. The two alternate when both have work. `flush` lifts the budget.

    Args:
        state_dir: the daemon's state dir (`samples/`, `catalog.sqlite`, `index/`, `checkpoints/`).
        store_max_bytes: disk budget of the sample store.
        index_options: how the index is built (`Settings.index_options()`); its GPU search is
            turned on here when `device` is CUDA.
        feature_dim: the backbone's feature size (the index's vector size).
        device: where the frozen encoder embeds.
        decode_size: side of decoded images (the training resolution).
        metrics_callback: called with `sizes_by_version()` after the index changes.
        limits: decode limits for stored bytes (they passed the daemon's limits once).
        budget: the share of training compute embedding may use; default unbounded.
    """

    def __init__(self, state_dir: Path, store_max_bytes: int, index_options: IndexOptions,
                 feature_dim: int, device: torch.device | str, decode_size: int,
                 metrics_callback: Callable[[dict[int, int]], None] | None = None, *,
                 limits: DecodeLimits | None = None, seed: int = 0, budget: ComputeBudget | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.checkpoint_root = self.state_dir / "checkpoints"
        self.device = torch.device(device)
        self.decode_size = decode_size
        self.limits = limits or DecodeLimits()
        self.metrics_callback = metrics_callback
        self.budget = budget or ComputeBudget(share=None)
        self._lock_fd = lock_state(self.state_dir)
        try:
            options = replace(index_options, gpu=self.device.type == "cuda")
            self.index = VectorIndex(self.state_dir, feature_dim, options)
            self.store = SampleStore(self.state_dir, store_max_bytes, seed=seed, on_evict=self._evicted)
            self.index.load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.last_refresh_seconds: float | None = None
        self._encoder: Encoder | None = None
        self._pending: deque[_Batch | _Handover] = deque()  # store writes, in the order submitted
        self._refresh: tuple[int, Path] | None = None  # the newest checkpoint not being embedded yet
        self._rebuild: _Rebuild | None = None
        self._unindexed: list[str] = []  # stored, not yet in the live index; newest last
        self._seen: dict[int, float] = {}  # experience checkpoints -> when this thread learnt of them
        self._refresh_turn = False  # alternates refresh and new-sample chunks
        self._urgent = 0  # flushes waiting: the budget does not bind
        self._busy = True  # until the thread has restored its encoder and scheduled any refresh
        self._storing = 0  # batches taken from `_pending` and being written to the store
        self._stopping = False
        self._unsaved = False  # live index changed since it was last published
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)

    # ---- called from the daemon (any thread)
    @property
    def encoder_version(self) -> int | None:
        """Version (experience number) of the encoder behind the live index, None before one."""
        return self._encoder.version if self._encoder else None

    def index_size(self) -> int:
        return self.index.size

    def sizes_by_version(self) -> dict[int, int]:
        return self.index.sizes_by_version()

    def upkeep(self) -> Upkeep:
        """The live index's freshness and the cost of keeping it (read by the metrics at scrape)."""
        with self._cond:
            live, rebuild = self.encoder_version or 0, self._rebuild
            newer = [seen for version, seen in self._seen.items() if version > live]
            behind = max(self._seen, default=live) - live
            stale = time.monotonic() - min(newer) if newer else 0.0
            progress = min(1.0, rebuild.done / rebuild.total) if rebuild and rebuild.total else 1.0
            unindexed = len(self._unindexed)
        return Upkeep(behind, stale, unindexed, progress, dict(self.budget.seconds), self.budget.used_share)

    def start(self) -> None:
        """Start the thread; it first restores the encoder and schedules any refresh missed by a crash."""
        self._thread.start()

    def submit(self, sample_ids: list[str], encoded: list[bytes], experience: int, domains: list[str],
               labels: list[str | None] | None = None, probes: bool | list[bool] = False) -> None:
        """Queue samples for the store (and the index, if not probes); blocks only when far behind."""
        flags = [probes] * len(sample_ids) if isinstance(probes, bool) else list(probes)
        batch = _Batch(list(sample_ids), list(encoded), experience, list(domains), labels, flags)
        with self._cond:
            while len(self._pending) >= MAX_PENDING and not self._stopping:
                self._cond.wait()
            self._pending.append(batch)
            self._cond.notify_all()

    def hand_over(self, experience: int, to: int, trained: int) -> None:
        """File the last `trained` samples of `experience` (and the probes among them) under `to`, in
        the store's catalog and the index, after every batch submitted before (a drift boundary:
        they came after the change point). Queued like a batch, so a refresh requested after it
        re-embeds them under `to`."""
        with self._cond:
            self._pending.append(_Handover(experience, to, trained))
            self._cond.notify_all()

    def new_encoder(self, version: int, checkpoint_dir: Path) -> None:
        """Re-embed the store with this experience checkpoint's backbone and swap the index in.

        A refresh under way finishes first; a newer request replaces one not started yet.
        """
        with self._cond:
            self._refresh = (version, Path(checkpoint_dir))
            self._seen.setdefault(version, time.monotonic())
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait, with the budget lifted, until every submitted batch is stored and embedded and every
        requested refresh is swapped in; False on timeout."""
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._work_left() or self._stopping, timeout)
            finally:
                self._urgent -= 1

    def wait_stored(self, timeout: float | None = None) -> bool:
        """Wait until every batch submitted so far is in the store; the budget still binds, so it
        may not be embedded yet (a store write waits at most for the chunk under way, and that for
        its turn on the cores); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pending or self._storing) or self._stopping, timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Store what is queued, give up a running refresh, save the index, close the store."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._rebuild is not None:
            log.info("index_refresh_aborted", encoder_version=self._rebuild.encoder.version,
                     note="redone on the next start")
        while self._pending:
            self._store(self._pending.popleft())  # embedded on the next start (`_restore`)
        if self._unsaved:
            self.index.save()
        self.store.close()
        os.close(self._lock_fd)

    # ---- the thread
    def _run(self) -> None:
        try:
            self._restore()
        except Exception:
            log.exception("indexer_restore_failed")
        while (task := self._next_task()) is not None:
            try:
                task()
            except Exception:
                log.exception("indexer_task_failed")

    def _next_task(self) -> Callable[[], None] | None:
        """The next thing to do, waiting for one: store a batch, start a refresh, or (when the
        budget allows) embed a chunk; None once stopping."""
        with self._cond:
            while not self._stopping:
                if self._pending:
                    self._storing += 1
                    return self._task(partial(self._store_counted, self._pending.popleft()))
                if self._refresh is not None and self._rebuild is None:
                    request, self._refresh = self._refresh, None
                    return self._task(partial(self._start_rebuild, *request))
                chunk = self._embedding_chunk()
                if chunk is not None and (self._urgent or self.budget.allows()):
                    return self._task(chunk)
                self._busy = False
                self._cond.notify_all()
                self._cond.wait(POLL_S if chunk is not None else None)
            return None

    def _task(self, task: Callable[[], None]) -> Callable[[], None]:
        self._busy = True
        self._cond.notify_all()
        return task

    def _work_left(self) -> bool:
        return bool(self._pending or self._refresh or self._rebuild or self._unindexed or self._busy)

    def _embedding_chunk(self) -> Callable[[], None] | None:
        """A refresh chunk or a new-samples chunk (alternating when both have work), or None."""
        can_refresh, can_embed = self._rebuild is not None, bool(self._unindexed) and self._encoder is not None
        if can_refresh and can_embed:
            self._refresh_turn = not self._refresh_turn
            can_refresh = self._refresh_turn
        if can_refresh:
            return self._refresh_chunk
        return self._embed_chunk if can_embed else None

    def _restore(self) -> None:
        """Load the live index's encoder; queue a drift tail a crash kept from being handed on, and
        the stored samples the index lacks (additions lost in a crash, batches stored at stop);
        schedule a refresh if it is behind the checkpoints."""
        checkpoints = experience_checkpoints(self.checkpoint_root)
        version = self.index.current_version
        if version is not None and version in checkpoints:
            try:
                self._encoder = Encoder.load(version, checkpoints[version], self.device, meta=True)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("index_encoder_unreadable", version=version, error=str(exc))
        with self._cond:
            for experience, trained in reversed(self.store.catalog.pending_handovers()):
                self._pending.appendleft(_Handover(experience, experience + 1, trained))  # before new batches
            if self._encoder is not None:
                self._unindexed = self.index.missing(self.store.sample_ids(probe=False))
            if not checkpoints:
                return
            latest = max(checkpoints)
            self._seen.setdefault(latest, time.monotonic())
            if self._encoder is None or latest > version:
                log.info("index_refresh_scheduled", index_version=version, checkpoint=latest)
                if self._refresh is None:
                    self._refresh = (latest, checkpoints[latest])

    def _evicted(self, sample_ids: list[str]) -> None:
        """The store dropped samples: drop them from the live index and from a refresh in progress."""
        self._unsaved |= self.index.remove(sample_ids) > 0
        if self._rebuild is not None:
            self._rebuild.evicted.update(sample_ids)

    def _store_counted(self, batch: _Batch) -> None:
        """`_store` as the thread's task, counted for `wait_stored`."""
        try:
            self._store(batch)
        finally:
            with self._cond:
                self._storing -= 1
                self._cond.notify_all()

    def _store(self, batch: _Batch | _Handover) -> None:
        """Write a batch to the store; its non-probe samples still stored wait to be embedded. A hand
        over queued among the batches is applied in its turn."""
        if isinstance(batch, _Handover):
            self._hand_over(batch)
            return
        self.store.add(batch.sample_ids, batch.encoded, batch.experience, batch.domains,
                       batch.labels, batch.probes)
        if self._encoder is None and self._rebuild is None:
            return  # the first refresh, when it starts, embeds the whole store
        stored = self.store.catalog.get(batch.sample_ids)
        waiting = [sid for sid, probe in zip(batch.sample_ids, batch.probes, strict=True)
                   if sid in stored and not probe]
        with self._cond:
            self._unindexed += waiting
            del self._unindexed[:-MAX_UNINDEXED]  # the oldest wait for the next refresh

    def _hand_over(self, handover: _Handover) -> None:
        """File the samples under their new experience in the store's catalog, the live index and a
        refresh under way (its pages read before keep the old experience otherwise)."""
        filed = self.store.hand_over(handover.experience, handover.to, handover.trained)
        self._unsaved |= self.index.hand_over(filed) > 0
        if self._rebuild is not None:
            self._rebuild.experiences = [filed.get(sid, exp)
                                         for sid, exp in zip(self._rebuild.ids, self._rebuild.experiences, strict=True)]
        log.info("experience_handover", experience=handover.experience, to=handover.to,
                 trained=handover.trained, samples=len(filed))

    def _embed_chunk(self) -> None:
        """Embed the newest `EMBED_BATCH` waiting samples still stored into the live index."""
        with self._cond:
            sample_ids = self._unindexed[-EMBED_BATCH:]
            del self._unindexed[-EMBED_BATCH:]
        rows = self.store.catalog.get(sample_ids)
        sample_ids = [sid for sid in sample_ids if sid in rows]  # the store may have evicted some
        encoded = self.store.read(sample_ids)
        with self.budget.turns:
            started = time.perf_counter()
            images, kept = decode_images(encoded, self.decode_size, self.limits)
            vectors = self._encoder(images) if kept else None
            self.budget.spent("embed", time.perf_counter() - started)
        if vectors is None:
            return
        ids = [sample_ids[i] for i in kept]
        added = self.index.add(self._encoder.version, vectors, ids, [rows[sid].experience for sid in ids])
        self._unsaved |= added > 0
        self._report()

    def _start_rebuild(self, version: int, checkpoint_dir: Path) -> None:
        """Load checkpoint `version`'s encoder and start re-embedding the store with it."""
        encoder = Encoder.load(version, checkpoint_dir, self.device, meta=True)
        total = len(self.store.sample_ids(probe=False))
        # Only the rows stored so far: rows stored meanwhile wait in `_unindexed` (`_store`) and are
        # embedded with this encoder once it is live. Paging them too made the refresh chase the
        # stream: when samples arrived faster than its compute share embedded them, it never ended.
        until = self.store.catalog.last_rowid()
        pages = self.store.iter_records(probe=False, batch_size=EMBED_BATCH, until=until)
        self._rebuild = _Rebuild(encoder, pages, total, until, time.perf_counter())

    def _refresh_chunk(self) -> None:
        """Re-embed the next page of the store; swap the new index in after the last page."""
        rebuild = self._rebuild
        try:
            rows, payloads = next(rebuild.pages)
        except StopIteration:
            self._finish_rebuild(rebuild)
            return
        except Exception:
            self._rebuild = None  # e.g. a corrupt record: logged by `_run`; the next checkpoint redoes it
            raise
        with self.budget.turns:
            started = time.perf_counter()
            images, kept = decode_images(payloads, self.decode_size, self.limits)
            vectors = rebuild.encoder(images) if kept else None
            self.budget.spent("refresh", time.perf_counter() - started)
        if vectors is not None:
            rebuild.vectors.append(vectors)
            rebuild.ids += [rows[i].sample_id for i in kept]
            rebuild.experiences += [rows[i].experience for i in kept]
        rebuild.done += len(rows)

    def _finish_rebuild(self, rebuild: _Rebuild) -> None:
        """Build the re-embedded vectors into an index, swap it in, and make its encoder live."""
        keep = [i for i, sid in enumerate(rebuild.ids) if sid not in rebuild.evicted]
        matrix = np.concatenate(rebuild.vectors) if rebuild.vectors else np.zeros((0, self.index.dim), np.float32)
        built = self.index.build(rebuild.encoder.version, matrix[keep], [rebuild.ids[i] for i in keep],
                                 [rebuild.experiences[i] for i in keep])
        self.index.swap(built)  # publishes it: nothing unsaved until the next change
        later = self.store.sample_ids(probe=False, after=rebuild.until)  # stored during the refresh: not in it
        with self._cond:
            self._encoder, self._rebuild, self._unsaved = rebuild.encoder, None, False
            self._unindexed = self.index.missing(later)[-MAX_UNINDEXED:]
        self.last_refresh_seconds = time.perf_counter() - rebuild.started
        log.info("index_refreshed", encoder_version=rebuild.encoder.version, vectors=built.size,
                 seconds=round(self.last_refresh_seconds, 2))
        self._report()

    def _report(self) -> None:
        if self.metrics_callback is not None:
            self.metrics_callback(self.index.sizes_by_version())
