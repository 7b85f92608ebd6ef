"""Task-tailored snapshots: route a target set to an experience checkpoint, optionally SEPT it.

`SnapshotEngine.create` follows docs/design.md, "Snapshots":

1. embed the target images with the encoder of the live index version;
2. `route` (SDR-style, `replay.routing.route_targets`): kNN of the targets among stored
   samples -> similarity-weighted votes per experience -> ranked candidate checkpoints;
   with labels, a runner-up whose leave-one-out kNN on the labelled targets beats the top
   vote's by McNemar's z >= LABEL_SWITCH_Z (2) and by LABEL_SWITCH_GAIN (5 points) replaces it;
3. `sept` (`learners.sept`): retrieve the `budget` nearest stored samples (when the index
   lags the newest checkpoint, `rerank_pool` x the budget re-ranked by the newest encoder:
   deploy/snapshot_rerank.py), keep those inside the targets' k-NN manifold
   (`replay.retrieval.within_targets`: a store with nothing like the targets gives SEPT
   nothing) and continue SSL on them with the targets, from the chosen checkpoint
   (`route+sept`) or the latest one (`sept`, the default);
4. publish `snapshots/<name>/` with `model.safetensors` (the backbone alone) and
   `manifest.json` (`deploy.snapshot_files.SnapshotShelf`: where snapshots live, names,
   writing, reading and listing them).

The engine works online, on the daemon's `Indexer` store and index (HTTP threads, while
training goes on; one snapshot at a time), and offline on a stopped daemon's state dir
(`SnapshotEngine.open_offline`). `POST /admin/snapshots` bodies are parsed in
deploy/snapshot_request.py; failures are `deploy.snapshot_errors` kinds, never HTTP statuses.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy.checkpoints import MANIFEST
from deploy.compute_turns import ComputeTurns
from deploy.indexer import (
    Encoder,
    backbone_from_checkpoint,
    decode_images,
    experience_checkpoints,
    lock_state,
)
from deploy.learner import trained_preset
from deploy.metrics import Metrics
from deploy.sept_child import continue_checkpoint, continue_in_child
from deploy.snapshot_errors import (
    BadRequest,
    Conflict,
    NotFound,
    Unavailable,
)
from deploy.snapshot_files import SnapshotShelf, check_name, default_name
from deploy.snapshot_rerank import RERANK_MAX_POOL, RERANK_POOL, embed_stored
from learners.augment import EvalTransform
from learners.device import pick_device
from learners.evaluation import embed, encode_labels
from learners.presets import PRESETS
from learners.protocol import loo_knn_accuracy, loo_knn_correct, paired_z
from learners.sept import SEPT_EPOCHS, SEPT_MAX_STEPS
from learners.snapshot import backbone_spec, save_backbone
from replay.catalog import SampleRow
from replay.index import CURRENT_FILE, VectorIndex
from replay.index_options import IndexOptions
from replay.retrieval import RELEVANCE_K, rerank_budget, retrieve_budget, within_targets
from replay.routing import route_targets
from replay.store import SampleStore
from safefiles.publish import read_pointer
from streamer.decode import decode_image, sniff_format
from streamer.limits import DecodeLimits
from streamer.records import RejectedRecord

STRATEGIES = ("route", "sept", "route+sept")
# what a request without a strategy gets: SEPT from the newest checkpoint scored above SEPT from
# the routed one in most runs of the snapshot benchmark (docs/snapshots.md, "Which start").
DEFAULT_STRATEGY = "sept"
MAX_TARGETS = 10_000
LABEL_CANDIDATES = 3  # top candidates compared by kNN accuracy when labels are given
LABEL_SWITCH_Z = 2.0  # McNemar z a runner-up needs over the top vote to be chosen instead
LABEL_SWITCH_GAIN = 0.05  # and this much more leave-one-out kNN accuracy: significant is not enough
LABEL_SWITCH_VOTE = 0.5  # and at least this share of the top's vote: labels break near-ties only
BUDGET_SHARE, BUDGET_MIN, BUDGET_MAX = 0.05, 64, 2000  # default SEPT budget: a share of the store,
BUDGET_PER_TARGET = 1 / 3  # and at most a third of the targets' count (docs/snapshots.md, "Budget per target")
# SEPT trains at most SEPT_MAX_STEPS batches, so no preset ever sees more samples than this:
# a larger budget would only make retrieval and reads hold the index and store locks longer.
MAX_BUDGET = SEPT_MAX_STEPS * max(preset.batch_size for preset in PRESETS.values())
ATTEMPTS = 3  # re-embed when the index swapped encoder versions under a snapshot
SNAPSHOT_MAX_BYTES = 2 << 30
"""Decoded pixels one snapshot may hold (its targets and SEPT samples, counting the stacking copy);
a request over it is refused before anything is decoded, a default budget shrinks to fit."""


# ---- checks of what the engine is asked (shared with deploy/snapshot_request.py; the name's
# check is deploy.snapshot_files.check_name)

def parse_strategy(value: Any) -> str:
    if value not in STRATEGIES:
        raise BadRequest(f"strategy must be one of {', '.join(STRATEGIES)}, got {str(value)[:40]!r}")
    return value


def default_budget(targets: int, stored: int) -> int:
    """SEPT's budget when a request names none: 5 % of the store, at most a third of the target
    images (so the targets make at least three quarters of what SEPT trains on: more retrieval
    cost accuracy against training on the targets alone, docs/snapshots.md), within 64..2000."""
    return max(BUDGET_MIN, min(round(BUDGET_SHARE * stored), round(BUDGET_PER_TARGET * targets), BUDGET_MAX))


def parse_budget(value: Any) -> int | None:
    """A request's SEPT budget; None (absent or empty) is the engine's default for the store."""
    return _bounded_int(value, "budget", MAX_BUDGET, "the most samples SEPT trains on")


def parse_epochs(value: Any) -> int:
    """A request's SEPT passes over its targets and retrieved samples; absent or empty: SEPT_EPOCHS.

    More passes than SEPT_MAX_STEPS could not change anything (each pass is at least one step),
    so they are refused; the step cap bounds what any value costs.
    """
    epochs = _bounded_int(value, "epochs", SEPT_MAX_STEPS, f"SEPT's passes, at most {SEPT_MAX_STEPS} steps in all")
    return SEPT_EPOCHS if epochs is None else epochs


def _bounded_int(value: Any, field: str, most: int, meaning: str) -> int | None:
    """`value` (an int or its digits) from 1 to `most`; None when absent or empty; else BadRequest."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise BadRequest(f"{field} must be an integer from 1 to {most} ({meaning}), got {str(value)[:40]!r}")
    return value


# ---- the engine

class SnapshotEngine:
    """Builds snapshots from a store and an index, published on `state_dir/snapshots/` (`shelf`).

    Args:
        state_dir: the daemon's state dir (its `checkpoints/` are the candidates).
        store, index: the sample store and the FAISS index (the daemon's Indexer's, or opened offline).
        device: where targets are embedded and SEPT trains.
        decode_size: side of decoded images (the training resolution).
        metrics: where `deploy.snapshot_request` counts `snapshot_requests{strategy,outcome}`
            and `snapshot_seconds`.
        targets_dir: TAILORD_TARGETS_DIR; JSON requests may only name paths inside it
            (`deploy.snapshot_request`).
        limits: decode limits for target images.
        max_bytes: ceiling of decoded pixels per snapshot (SNAPSHOT_MAX_BYTES).
        sept_child: (torch threads, niceness) to train SEPT in a child process with
            (`deploy.sept_child`; the daemon's, so a snapshot cannot slow training); None: in this process.
        rerank_pool: when the index lags the newest checkpoint, SEPT retrieves this many times
            its budget and the newest encoder picks the budget among them (`_rerank`); 1: never.
        turns: the daemon's turns on the CPU's cores, held around each chunk the re-rank embeds.
        relevance_k: SEPT keeps a retrieved sample only inside the targets' k-NN manifold at
            this k (`replay.retrieval.within_targets`); 0: keeps all it retrieved.

    Routing is `replay.routing.route_targets`, SEPT's training `learners.sept`; the snapshot
    folders are `shelf` (`deploy.snapshot_files.SnapshotShelf`: `describe` and `file_path`
    are its). Routing and retrieval run on HTTP threads beside training, and so does SEPT
    without `sept_child`: it draws its crops and batch order from its own generators
    (`learners.sept`) and builds its model on the meta device, so it never reads, advances
    or reseeds the global RNGs that drive the daemon's augmentation.
    """

    def __init__(self, state_dir: Path, store: SampleStore, index: VectorIndex, device: torch.device | str,
                 decode_size: int, metrics: Metrics | None = None, targets_dir: Path | None = None,
                 limits: DecodeLimits | None = None, max_bytes: int = SNAPSHOT_MAX_BYTES,
                 sept_child: tuple[int, int] | None = None, rerank_pool: int = RERANK_POOL,
                 turns: ComputeTurns | None = None, relevance_k: int = RELEVANCE_K) -> None:
        self.state_dir = Path(state_dir)
        self.checkpoint_root = self.state_dir / "checkpoints"
        self.shelf = SnapshotShelf.in_state_dir(self.state_dir).prepare()
        self.store = store
        self.index = index
        self.device = torch.device(device)
        self.decode_size = decode_size
        self.metrics = metrics
        self.targets_dir = Path(targets_dir) if targets_dir is not None else None
        self.limits = limits or DecodeLimits()
        self.max_bytes = max_bytes
        self.sept_child = sept_child
        self.rerank_pool = rerank_pool
        self.turns = turns or ComputeTurns(enabled=False)
        self.relevance_k = relevance_k
        self._lock = threading.Lock()
        self._encoder: Encoder | None = None
        self._lock_fd: int | None = None  # held when opened offline

    @classmethod
    def open_offline(cls, state_dir: Path, device: torch.device | str = "auto",
                     index_options: IndexOptions | None = None, rerank_pool: int = RERANK_POOL,
                     relevance_k: int = RELEVANCE_K) -> SnapshotEngine:
        """An engine on a stopped daemon's state dir; Conflict if it is running or has no index.

        `index_options`: the daemon's (`Settings.index_options()`); None: the library's defaults.
        `rerank_pool`, `relevance_k`: the daemon's `snapshot_rerank_pool` and `snapshot_relevance_k`.
        """
        state_dir = Path(state_dir)
        if not (state_dir / "checkpoints").is_dir():
            raise NotFound(f"{state_dir} is not a tailord state dir (no checkpoints/)")
        try:
            lock_fd = lock_state(state_dir)
        except BlockingIOError:
            raise Conflict(f"{state_dir} is in use by a running daemon: stop it or ask it over HTTP") from None
        try:
            dim, decode_size = _index_dim(state_dir), _latest_resolution(state_dir)
            index = VectorIndex(state_dir, dim, index_options)
            index.load()
            store = SampleStore(state_dir, max_bytes=1 << 62)  # read only here: the budget never applies
            engine = cls(state_dir, store, index, pick_device(str(device)), decode_size, rerank_pool=rerank_pool,
                         relevance_k=relevance_k)
        except BaseException:
            os.close(lock_fd)
            raise
        engine._lock_fd = lock_fd
        return engine

    def close(self) -> None:
        """Close the store and release the state dir (offline engines only)."""
        if self._lock_fd is not None:
            self.store.close()
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def root(self) -> Path:
        """The folder of the snapshots (`state_dir/snapshots/`)."""
        return self.shelf.root

    def describe(self, name: str) -> dict[str, Any]:
        """The manifest of snapshot `name` (`SnapshotShelf.describe`)."""
        return self.shelf.describe(name)

    def file_path(self, name: str, filename: str) -> Path:
        """A downloadable file of snapshot `name` (`SnapshotShelf.file_path`)."""
        return self.shelf.file_path(name, filename)

    # ---- building
    def create(self, targets: list[tuple[str, bytes]], labels: dict[str, str] | None = None,
               strategy: str = DEFAULT_STRATEGY, budget: int | None = None, name: str | None = None,
               epochs: int | None = None) -> dict[str, Any]:
        """Build snapshot `name` for `targets` (filename, encoded image); returns its manifest."""
        strategy = parse_strategy(strategy)
        budget = parse_budget(budget)
        epochs = parse_epochs(epochs)
        name = check_name(name) if name is not None else default_name()
        with self._lock:
            started = time.perf_counter()
            if self.shelf.exists(name):
                raise Conflict(f"snapshot {name!r} already exists")
            self._check_targets(targets)
            stored = len(self.store.sample_ids(probe=False))
            budget = self._fit_budget(len(targets), budget, stored, "sept" in strategy)
            images = self._decode_targets(targets)
            labels = self._check_labels(labels, [filename for filename, _ in targets])
            checkpoints = experience_checkpoints(self.checkpoint_root)
            for _ in range(ATTEMPTS):
                encoder = self._live_encoder(checkpoints)
                queries = encoder(images)
                candidates = self._candidates(queries, checkpoints)
                pool = self._retrieve(queries, self._pool_size(budget, encoder.version, checkpoints, strategy))
                if self.index.current_version == encoder.version:
                    break
            else:
                raise Unavailable("the index kept changing encoder versions; retry")
            retrieved, rerank, relevance = self._sept_samples(pool, images, queries, budget, checkpoints, encoder)
            chosen = max(checkpoints) if strategy == "sept" else self._choose(
                candidates, images, [filename for filename, _ in targets], labels, checkpoints)
            source = checkpoints[chosen]
            names = self.store.catalog.experience_names()
            for candidate in candidates:
                candidate["name"] = (names.get(candidate["experience"]) or {}).get("name")
            rows: list[SampleRow] = []
            if "sept" in strategy:
                rows, encoded = self._read(retrieved[:sept_capacity(source)])
                backbone, steps = self._sept(source, encoded, epochs, images)
            else:
                backbone, steps = backbone_from_checkpoint(source, "cpu", meta=True)[0], 0
            manifest = {
                "name": name, "strategy": strategy, "chosen_experience": chosen,
                "chosen_experience_info": names.get(chosen),  # its name, boundary, offsets, time span
                "source_checkpoint": source.name, "candidates": candidates,
                "labels_used": any("knn_accuracy" in c for c in candidates),
                "label_check": self._label_check(backbone, images, [f for f, _ in targets], labels, checkpoints,
                                                 encoder.manifest["input"]),
                "target_count": len(targets), "labelled_count": len(labels),
                "budget": budget if "sept" in strategy else None,
                "retrieved_count": len(rows), "retrieved_share": len(rows) / max(stored, 1),
                "retrieved_by_experience": dict(Counter(str(row.experience) for row in rows)), "rerank": rerank,
                "relevance": relevance,
                "sept_steps": steps, "sept_epochs": epochs if "sept" in strategy else 0,
                "encoder_version": encoder.version, "index_freshness": index_freshness(encoder.version, checkpoints,
                                                                                   stored, self.index.size),
                "method": encoder.manifest.get("method"), "preset": encoder.manifest.get("preset"),
                "backbone": backbone_spec(backbone), "input": encoder.manifest["input"],
                "seconds": round(time.perf_counter() - started, 3),
            }
            return self.shelf.publish(name, manifest, lambda folder: save_backbone(backbone, folder))

    @staticmethod
    def _check_targets(targets: list[tuple[str, bytes]]) -> None:
        if not targets:
            raise BadRequest("no target images")
        if len(targets) > MAX_TARGETS:
            raise BadRequest(f"{len(targets)} target images; at most {MAX_TARGETS}")
        names = [filename for filename, _ in targets]
        if len(set(names)) != len(names):
            raise BadRequest("target file names must be distinct")

    def _fit_budget(self, targets: int, budget: int | None, stored: int, sept: bool) -> int:
        """The SEPT budget, checked with the targets against `max_bytes` before anything is decoded.

        Targets and SEPT samples are decoded to (3, decode_size, decode_size) uint8, held one by
        one and then stacked (twice the bytes at the peak). An explicit budget, or targets, over
        the ceiling is BadRequest; the default budget shrinks to what fits.
        """
        per_image = 2 * 3 * self.decode_size ** 2
        fits = self.max_bytes // per_image  # images in all
        room = fits - targets
        if room < (2 if sept else 0):
            raise BadRequest(f"{targets} target images at {self.decode_size} px are over this daemon's snapshot "
                             f"memory ceiling ({self.max_bytes} bytes of decoded pixels): send at most "
                             f"{max(fits - (2 if sept else 0), 0)}")
        if budget is None:
            budget = default_budget(targets, stored)
            return min(budget, room) if sept else budget
        if sept and budget > room:
            raise BadRequest(f"budget {budget} with {targets} target images at {self.decode_size} px is over "
                             f"this daemon's snapshot memory ceiling ({self.max_bytes} bytes of decoded pixels): "
                             f"at most {room}")
        return budget

    def _decode_targets(self, targets: list[tuple[str, bytes]]) -> torch.Tensor:
        self._check_targets(targets)
        images = []
        for filename, data in targets:
            if sniff_format(data) == "tar":
                raise BadRequest(f"target {filename!r} is a tar archive: send the images themselves")
            try:
                images.append(decode_image(data, self.limits, self.decode_size))
            except RejectedRecord as exc:
                raise BadRequest(f"target {filename!r} cannot be decoded: {exc.reason}") from None
        return torch.stack(images)

    @staticmethod
    def _check_labels(labels: dict[str, str] | None, names: list[str]) -> dict[str, str]:
        labels = labels or {}
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise BadRequest(f"labels name {len(unknown)} file(s) not among the targets, e.g. {unknown[0]!r}")
        return labels

    def _live_encoder(self, checkpoints: dict[int, Path]) -> Encoder:
        """The encoder of the live index version (cached while the version stays the same)."""
        version = self.index.current_version
        if version is None:
            raise Conflict("no experience finished yet: nothing is indexed to route or retrieve")
        if version not in checkpoints:
            raise Conflict(f"the checkpoint of encoder version {version} is gone; wait for the next experience")
        if self._encoder is None or self._encoder.version != version:
            self._encoder = Encoder.load(version, checkpoints[version], self.device, meta=True)
        return self._encoder

    def _candidates(self, queries: np.ndarray, checkpoints: dict[int, Path]) -> list[dict[str, Any]]:
        """Experiences ranked by similarity-weighted votes of the targets' neighbours."""
        if self.index.size == 0:
            raise Conflict("no stored samples are indexed yet")
        ranked = route_targets(self.index, queries)
        candidates = [{"experience": exp, "vote_share": share} for exp, share in ranked if exp in checkpoints]
        if not candidates:
            raise Conflict("no experience checkpoint is left for the experiences the targets resemble")
        return candidates

    def _choose(self, candidates: list[dict[str, Any]], images: torch.Tensor, names: list[str],
                labels: dict[str, str], checkpoints: dict[int, Path]) -> int:
        """Top vote; with labels (>= 2 classes of >= 2 images) a runner-up among the top
        LABEL_CANDIDATES may replace it (`label_switch`) by its leave-one-out kNN (the evaluation
        protocol, `learners.protocol`) on the labelled images."""
        usable = labelled_targets(names, labels)
        if usable is None:
            return candidates[0]["experience"]
        labelled, y = usable
        correct = {}
        for candidate in candidates[:LABEL_CANDIDATES]:
            exp = candidate["experience"]
            encoder = Encoder.load(exp, checkpoints[exp], self.device, meta=True)
            correct[exp] = loo_knn_correct(torch.from_numpy(encoder(images[labelled])), y)
            candidate["knn_accuracy"] = correct[exp].float().mean().item()
        return label_switch(candidates[:LABEL_CANDIDATES], correct)

    def _label_check(self, backbone: nn.Module, images: torch.Tensor, names: list[str], labels: dict[str, str],
                     checkpoints: dict[int, Path], spec: dict[str, Any]) -> dict[str, Any] | None:
        """With usable labels: leave-one-out kNN on the labelled targets of the snapshot's backbone
        and of the newest experience checkpoint's, so the user sees whether tailoring helped."""
        usable = labelled_targets(names, labels)
        if usable is None:
            return None
        labelled, y = usable
        transform = EvalTransform(spec["resolution"], spec["mean"], spec["std"]).to(next(backbone.parameters()).device)
        latest = max(checkpoints)
        baseline = Encoder.load(latest, checkpoints[latest], self.device, meta=True)
        snapshot_knn, k = loo_knn_accuracy(embed(backbone, images[labelled], transform), y)
        latest_knn, _ = loo_knn_accuracy(torch.from_numpy(baseline(images[labelled])), y)
        return {"snapshot_knn": round(snapshot_knn, 4), "latest_knn": round(latest_knn, 4), "k": k,
                "latest_checkpoint": checkpoints[latest].name, "protocol": "leave-one-out weighted kNN, T=0.07"}

    def _pool_size(self, budget: int, version: int, checkpoints: dict[int, Path], strategy: str) -> int:
        """How many samples to retrieve: 0 without SEPT; the budget when the index is the newest
        checkpoint's; else `rerank_pool` budgets to re-rank (`_rerank`), at most RERANK_MAX_POOL
        (so an explicit large budget cannot make a snapshot embed a whole store) and never fewer
        than the budget."""
        if "sept" not in strategy:
            return 0
        if not self._reranks(version, checkpoints):
            return budget
        return max(budget, min(budget * self.rerank_pool, RERANK_MAX_POOL))

    def _reranks(self, version: int, checkpoints: dict[int, Path]) -> bool:
        """Whether SEPT's retrieval is re-ranked: the index (at `version`) lags the newest checkpoint
        and the re-rank is on."""
        return self.rerank_pool > 1 and version != max(checkpoints)

    def _retrieve(self, queries: np.ndarray, budget: int) -> list[str]:
        if budget == 0:
            return []
        probes = set(self.store.sample_ids(probe=True))
        return retrieve_budget(self.index, queries, budget, exclude_probe_ids=probes)

    def _sept_samples(self, pool: list[str], images: torch.Tensor, queries: np.ndarray, budget: int,
                      checkpoints: dict[int, Path], live: Encoder
                      ) -> tuple[list[str], dict[str, int] | None, dict[str, int] | None]:
        """SEPT's samples from the retrieved `pool` (`queries`: the targets under `live`): re-ranked
        (`_rerank`), then those like the targets (`_keep_relevant`), both by the encoder that ranked
        them; with the manifest's `rerank` and `relevance`."""
        picked, rerank, ranked_by = self._rerank(pool, images, budget, checkpoints, live.version)
        if ranked_by is None:  # ranked by the live index: the targets' vectors are `queries`
            ranked_by = (live, queries, None)
        kept, relevance = self._keep_relevant(picked, *ranked_by)
        return kept, rerank, relevance

    def _rerank(self, pool: list[str], images: torch.Tensor, budget: int, checkpoints: dict[int, Path],
                version: int) -> tuple[list[str], dict[str, int] | None, tuple | None]:
        """SEPT's samples: `pool` as retrieved when the index is the newest encoder's, else the
        budget picked from it again by the newest encoder (deploy/snapshot_rerank.py); what was
        re-ranked, for the manifest (None: nothing); and (the newest encoder, the targets' and the
        picked samples' vectors under it) when it re-ranked, so they are not embedded again."""
        if not pool or not self._reranks(version, checkpoints):
            return pool[:budget], None, None
        newest = max(checkpoints)
        fresh = Encoder.load(newest, checkpoints[newest], self.device, meta=True)
        ids, vectors = embed_stored(fresh, self._read, pool, self.decode_size, self.limits, self.turns)
        queries = fresh(images)  # (T, D)
        picked = rerank_budget(ids, vectors, queries, budget)
        row = {sid: i for i, sid in enumerate(ids)}
        return picked, {"index_encoder": version, "reranked_by": newest, "pool": len(ids)}, (
            fresh, queries, vectors[[row[sid] for sid in picked]])  # (B, D)

    def _keep_relevant(self, retrieved: list[str], ranker: Encoder, queries: np.ndarray,
                       vectors: np.ndarray | None) -> tuple[list[str], dict[str, int] | None]:
        """The retrieved samples inside the targets' k-NN manifold (`within_targets`) under `ranker`
        (`queries`: the targets' (T, D) vectors; `vectors`: the samples', None to embed them), best first;
        and what was kept, for the manifest (None: not tested, e.g. at most k targets)."""
        if not retrieved or self.relevance_k == 0 or len(queries) <= self.relevance_k:
            return retrieved, None
        ids = retrieved
        if vectors is None:
            ids, vectors = embed_stored(ranker, self._read, retrieved, self.decode_size, self.limits, self.turns)
        keep = within_targets(vectors, queries, self.relevance_k) if ids else np.zeros(0, dtype=bool)
        kept = [sid for sid, inside in zip(ids, keep, strict=True) if inside]
        return kept, {"k": self.relevance_k, "retrieved": len(ids), "kept": len(kept)}

    def _read(self, sample_ids: list[str]) -> tuple[list[SampleRow], list[bytes]]:
        """Catalog rows and bytes of the ids still stored (the store may evict while we read)."""
        for _ in range(ATTEMPTS):
            rows = self.store.catalog.get(sample_ids)
            sample_ids = [sid for sid in sample_ids if sid in rows and not rows[sid].probe]
            try:
                return [rows[sid] for sid in sample_ids], self.store.read(sample_ids)
            except KeyError:
                continue
        raise Unavailable("the sample store kept evicting the retrieved samples; retry")

    def _sept(self, checkpoint_dir: Path, encoded: list[bytes], epochs: int,
              targets: torch.Tensor) -> tuple[nn.Module, int]:
        """Continue the checkpoint's SSL method on the target images and the retrieved samples;
        (backbone, steps done). The targets themselves train too: on the held-out benchmark, SSL
        on the targets alone beat SSL on the retrieved samples alone (docs/snapshots.md)."""
        retrieved, _ = decode_images(encoded, self.decode_size, self.limits)
        images = torch.cat([targets, retrieved])  # (T + R, 3, S, S) uint8
        if len(images) < 2:
            raise Conflict(f"{len(targets)} target(s) and {len(retrieved)} retrieved sample(s) like them: "
                           "SEPT needs 2 images to train on")
        if self.sept_child is None:
            return continue_checkpoint(checkpoint_dir, images, self.device, epochs, SEPT_MAX_STEPS)
        threads, niceness = self.sept_child
        return continue_in_child(checkpoint_dir, images, self.device, epochs, SEPT_MAX_STEPS, threads, niceness,
                                 work_parent=self.shelf.root)


def label_switch(candidates: list[dict[str, Any]], correct: dict[int, torch.Tensor]) -> int:
    """The experience labels route to: the top vote (`candidates[0]`), unless a runner-up the
    vote nearly tied with (at least LABEL_SWITCH_VOTE of the top's vote share: labels break
    near-ties, they do not overrule a clear vote) gets more labelled images right by McNemar's
    z >= LABEL_SWITCH_Z (not the shots' luck) *and* by LABEL_SWITCH_GAIN of accuracy or more (a
    gain worth leaving the data's closest experience for: with hundreds of labels a 1-point
    difference is significant, and a different domain's encoder that happens to separate them a
    little better is no better snapshot). `correct`: experience -> (N,) bool, leave-one-out kNN
    right per labelled image. Sets `z_over_top_vote` on the runners-up.

    Example:
        >>> label_switch([{"experience": 2, "vote_share": 0.5}, {"experience": 1, "vote_share": 0.4}],
        ...              {2: torch.tensor([False] * 8), 1: torch.tensor([True] * 8)})
        1
    """
    top = candidates[0]["experience"]
    challengers = []
    for candidate in candidates[1:]:
        exp = candidate["experience"]
        candidate["z_over_top_vote"] = round(paired_z(correct[exp], correct[top]), 3)
        gain = correct[exp].float().mean().item() - correct[top].float().mean().item()
        near_tie = candidate["vote_share"] >= LABEL_SWITCH_VOTE * candidates[0]["vote_share"]
        if near_tie and candidate["z_over_top_vote"] >= LABEL_SWITCH_Z and gain >= LABEL_SWITCH_GAIN:
            challengers.append(candidate)
    return max(challengers, key=lambda c: c["z_over_top_vote"])["experience"] if challengers else top


def index_freshness(version: int, checkpoints: dict[int, Path], stored: int, indexed: int) -> dict[str, int]:
    """How the index a snapshot routed and retrieved on lagged (docs/design.md, "Index upkeep"):
    the newest experience checkpoint's number minus its encoder's, and stored samples it did not hold."""
    return {"versions_behind": max(checkpoints, default=version) - version, "unindexed": max(0, stored - indexed)}


def labelled_targets(names: list[str], labels: dict[str, str]) -> tuple[list[int], torch.Tensor] | None:
    """(indices of the labelled targets, their class ids), or None unless >= 2 classes have >= 2
    images each (fewer leave nothing to score leave-one-out)."""
    labelled = [i for i, filename in enumerate(names) if filename in labels]
    counts = Counter(labels[names[i]] for i in labelled)
    if len(counts) < 2 or min(counts.values()) < 2:
        return None
    y, _ = encode_labels([labels[names[i]] for i in labelled])
    return labelled, y


def sept_capacity(checkpoint_dir: Path) -> int:
    """The most samples SEPT from this checkpoint can use: SEPT_MAX_STEPS batches of the batch
    size it trained with. Retrieved samples past it are never read nor decoded.
    """
    manifest = json.loads((checkpoint_dir / MANIFEST).read_text())
    return SEPT_MAX_STEPS * trained_preset(manifest).batch_size


def _index_dim(state_dir: Path) -> int:
    """The vector size of the published index (its manifest), or Conflict without one."""
    index_dir = state_dir / "index"
    try:
        current = read_pointer(index_dir / CURRENT_FILE)
        return int(json.loads((index_dir / current / MANIFEST).read_text())["dim"])
    except (OSError, ValueError, KeyError, TypeError):
        raise Conflict(f"{state_dir} has no index yet: no experience finished") from None


def _latest_resolution(state_dir: Path) -> int:
    """The input resolution of the newest experience checkpoint (the training resolution)."""
    checkpoints = experience_checkpoints(state_dir / "checkpoints")
    if not checkpoints:
        raise Conflict(f"{state_dir} has no experience checkpoint yet")
    manifest = json.loads((checkpoints[max(checkpoints)] / MANIFEST).read_text())
    return int(manifest["input"]["resolution"])
