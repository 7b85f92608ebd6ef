"""The daemon loop: consume -> decode -> batch -> train step -> experience boundaries -> checkpoint.

Read it top to bottom: set-up (broker, learner, resume from the last good checkpoint,
stream, HTTP), then one loop over batches. `streamer`, `learners` and `replay` are
libraries; this file is the one place that wires them together.

Under torchrun every rank runs this loop on its own partitions. Each iteration the ranks
exchange a `Tick` and take the same decisions from it; rank 0 (the main rank) also owns
the checkpoints, the sample store and index, the probe sets and the HTTP API, and gets
the other ranks' samples and positions with each step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from pathlib import Path

import structlog
import torch

from deploy.batches import Prepared, Shared, batch_records, replay_count, standin, stream_batch_size
from deploy.boundaries import DRIFT_FILE, Boundaries, experience_record, label
from deploy.checkpoints import clean_temporaries, load_latest, write_checkpoint
from deploy.errors import UsageError
from deploy.evaluate import evaluate_row, keep_untrained, score_baselines
from deploy.history import History
from deploy.indexer import Indexer
from deploy.learner import (
    Learner,
    build_buffer,
    build_learner,
    learner_writers,
    load_learner_state,
    update_regularizer,
    weights_digest,
)
from deploy.metrics import Metrics, Throughput
from deploy.probes import ProbeSet, read_probe_sets, write_probe_set
from deploy.progress import Progress, read_offsets, write_offsets
from deploy.retention import directory_bytes, prune_checkpoints
from deploy.service import DaemonService
from deploy.settings import Settings, kafka_security
from deploy.snapshots import SnapshotEngine
from deploy.world import Tick, World, agree
from streamer.broker import EmbeddedBroker
from streamer.decode import decode_record
from streamer.dlq import DeadLetterQueue
from streamer.jpeg_batch import JpegBatchDecoder, jpeg_decode_problem
from streamer.kafka_client import client_config
from streamer.limits import DecodeLimits
from streamer.prefetch import Prefetcher
from streamer.records import RawRecord, RejectedRecord, Sample
from streamer.source import KafkaSource
from streamer.topics import ensure_topic, wait_for_broker

log = structlog.get_logger()

LAG_EVERY_S = 5.0
RECENT_BATCHES = 8  # recent stream batches kept for the regularizer's experience-end statistics


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its step, checkpoints and exits 0."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._set(signum))

    def _set(self, signum: int) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def run(settings: Settings) -> int:
    """Run until stopped; 0 on a clean stop."""
    world = World.from_env(settings.device)
    try:
        return run_rank(settings, world)
    finally:
        world.close()


def run_rank(settings: Settings, world: World) -> int:
    """The daemon as rank `world.rank` of `world.size` (a world of one without torchrun)."""
    stop = StopFlag()
    stop.install()
    if world.distributed:
        structlog.contextvars.bind_contextvars(rank=world.rank)
        if not settings.bootstrap_servers:
            raise UsageError("several ranks need a shared Kafka cluster: set TAILORD_BOOTSTRAP_SERVERS")
    state_dir = settings.state_dir
    ckpt_root = state_dir / "checkpoints"
    (state_dir / "metrics").mkdir(parents=True, exist_ok=True)
    if world.is_main:
        clean_temporaries(ckpt_root)
    metrics = Metrics()

    # ---- broker: the configured cluster, or an embedded one on a free port
    broker = None
    bootstrap = settings.bootstrap_servers
    if not bootstrap:
        broker = EmbeddedBroker()
        broker.start()
        bootstrap = broker.bootstrap
        log.info("embedded_broker_started", bootstrap=bootstrap,
                 note="no TAILORD_BOOTSTRAP_SERVERS set; produce to this address")
    client = client_config(kafka_security(settings))
    while not wait_for_broker(bootstrap, timeout=10, **client):
        log.warning("waiting_for_broker", bootstrap=bootstrap)
        if stop.requested:
            return 0
    if world.is_main:
        ensure_topic(bootstrap, settings.topic, max(settings.topic_partitions, world.size), **client)
    world.barrier()

    # ---- learner, replay buffer, probes and progress: fresh, or from the last good checkpoint
    checkpoint = load_latest(ckpt_root) if world.is_main else None
    if world.distributed:  # every rank resumes from the checkpoint rank 0 verified
        checkpoint = world.broadcast(checkpoint)
    # same backbone as the checkpoint (else UsageError); TAILORD_INIT_WEIGHTS only when fresh
    learner = build_learner(settings, world, resume=checkpoint.manifest if checkpoint is not None else None)
    buffer = build_buffer(settings) if learner.use_replay else None
    progress = Progress()
    history = History()
    probes = ProbeSet(1, settings.probe_max_images)
    boundaries = Boundaries(settings, metrics)
    if checkpoint is not None:
        load_learner_state(learner, checkpoint.path)
        boundaries.load(checkpoint.path)
        progress = Progress.from_json(checkpoint.manifest["progress"])
        progress.positions = read_offsets(checkpoint.path / "offsets.json")
        history = History.from_json(checkpoint.manifest["history"])
        if buffer is not None and (checkpoint.path / replay_dir(world.rank)).is_dir():
            buffer.load(checkpoint.path / replay_dir(world.rank))
        if (checkpoint.path / "probes.safetensors").is_file():
            probes = ProbeSet.load(checkpoint.path / "probes.safetensors")
        log.info("resumed", checkpoint=checkpoint.name, experience=progress.experience,
                 images_total=progress.images_total, positions=progress.positions)
    else:
        log.info("fresh_start", state_dir=str(state_dir))
        if world.is_main:
            # every probe set's second floor: the encoder before tailord trained it (the starting weights if set)
            durable("untrained", lambda: keep_untrained(learner, state_dir))
    probe_sets = read_probe_sets(state_dir / "metrics" / "probes")
    probe_sets = {j: p for j, p in probe_sets.items() if j < progress.experience}
    log.info("learner", device=str(learner.device), backbone=learner.describe()["backbone"]["name"],
             **learner.describe()["backbone"]["kwargs"],
             preset=learner.preset.name, method=settings.method, strategy=settings.strategy,
             batch_size=learner.preset.batch_size, resolution=learner.preset.resolution)

    # ---- sample store + FAISS index (a background thread), and the snapshot engine on top of them (rank 0)
    limits = DecodeLimits(max_record_bytes=settings.max_record_bytes, max_pixels=settings.max_pixels)
    decode_batch = jpeg_decoder(settings, limits, learner)

    def publish_index(sizes: dict[int, int]) -> None:
        metrics.index_vectors.clear()
        for version, count in sizes.items():
            metrics.index_vectors.labels(str(version)).set(count)

    indexer = snapshots = None
    if world.is_main:
        indexer = Indexer(state_dir, settings.store_max_bytes, settings.index_options(),
                          learner.backbone.feature_dim, learner.device, learner.preset.resolution, publish_index,
                          limits=limits, seed=settings.seed)
        indexer.start()
        snapshots = SnapshotEngine(state_dir, indexer.store, indexer.index, learner.device,
                                   learner.preset.resolution, metrics, settings.targets_dir, limits)

    # ---- stream: this rank's partitions, seeked to the checkpoint's offsets, decoded off the training thread
    dlq = DeadLetterQueue.connect(bootstrap, client)

    def decode(record: RawRecord):
        return decode_record(record.value, record.headers, limits, learner.preset.resolution)

    def on_reject(record: RawRecord, error: RejectedRecord) -> None:
        metrics.records_consumed.labels(settings.topic).inc()
        metrics.records_rejected.labels(error.reason).inc()
        log.warning("record_rejected", reason=error.reason, detail=error.detail[:200],
                    partition=record.partition, offset=record.offset)
        dlq.send(record, error.reason, error.detail)

    try:
        source = KafkaSource(bootstrap, settings.topic, settings.group_id, client,
                             max_record_bytes=settings.max_record_bytes,
                             shard=(world.rank, world.size) if world.distributed else None)
    except ValueError as exc:  # fewer partitions than ranks, or no such topic: a configuration error
        raise UsageError(str(exc)) from exc
    source.seek(progress.positions)
    stream_batch = stream_batch_size(learner.preset.batch_size, settings.replay_share if buffer else 0.0)
    pin = learner.device.type == "cuda"
    prefetcher = Prefetcher(source, decode, on_reject, batch_size=stream_batch,
                            split_on_domain="header" in settings.boundaries, workers=settings.decode_workers,
                            prepare=lambda samples: Prepared.of(samples, settings.probe_fraction, pin),
                            decode_batch=decode_batch)
    if world.distributed:
        log.info("rank_partitions", partitions=source.partitions, world_size=world.size)

    # ---- HTTP (rank 0): metrics, health, admin
    service = DaemonService(settings, metrics, learner, progress, history, prefetcher, checkpoint_name=checkpoint.name
                            if checkpoint else None)
    service.indexer, service.snapshots = indexer, snapshots
    server = service.start_http() if world.is_main else None
    if server is not None:
        log.info("http_listening", url=f"http://{settings.http_host}:{server.port}", metrics="/metrics",
                 admin="/admin/status")

    def save(kind: str) -> bool:
        """Checkpoint everything that must agree: model, optimizer, buffers, probes, progress, offsets.

        Every rank calls it at the same iteration; rank 0 writes, with the other ranks'
        replay buffers, and every rank then commits its partitions' offsets to the group.
        """
        started = time.perf_counter()
        buffers = world.gather(buffer.state_dict() if buffer is not None else None) if world.distributed else []
        if not world.is_main:
            prefetcher.request_commit(progress.positions)
            return True
        finished = progress.experience - 1
        name = f"exp-{finished:06d}" if kind == "experience" else f"exp-{finished:06d}-step-{progress.steps:09d}"
        writers = learner_writers(learner)
        writers["offsets.json"] = lambda p: write_offsets(p, settings.topic, progress.positions)
        writers["probes.safetensors"] = lambda p: probes.save(p)
        if boundaries.detector is not None:
            writers[DRIFT_FILE] = boundaries.save
        if buffer is not None:
            writers[f"{replay_dir(0)}/buffer"] = lambda p: buffer.save(p.parent)  # buffer.{safetensors,json}
            for rank, state in enumerate(buffers[1:], start=1):
                writers[f"{replay_dir(rank)}/buffer"] = buffer_writer(settings, state)
        manifest = {"kind": kind, "experience": finished, "progress": progress.to_json(),
                    "history": history.to_json(), "topic": settings.topic, "strategy": settings.strategy,
                    "world_size": world.size, **learner.describe()}
        try:
            saved = write_checkpoint(ckpt_root, name, writers, manifest)
        except Exception as exc:  # ENOSPC and friends (safetensors wraps them): keep training
            metrics.checkpoint_errors.labels(type(exc).__name__).inc()
            log.error("checkpoint_failed", checkpoint=name, error=str(exc),
                      kept=service.checkpoint_name, note="the previous checkpoint stays valid")
            return False
        elapsed = time.perf_counter() - started
        metrics.checkpoint_seconds.observe(elapsed)
        metrics.last_checkpoint_timestamp.set(time.time())
        service.checkpoint_name = saved.name
        prune_checkpoints(state_dir, settings.keep_experiences, saved.name, settings.keep_distinct,
                          indexer.index.centroids)
        metrics.state_dir_bytes.set(directory_bytes(state_dir))
        if not durable("metrics_export", lambda: history.export(state_dir / "metrics", service.throughput)):
            metrics.checkpoint_errors.labels("metrics_export").inc()
        prefetcher.request_commit(progress.positions)
        log.info("checkpoint", checkpoint=name, kind=kind, seconds=round(elapsed, 3),
                 images_total=progress.images_total)
        return True

    def end_experience(reason: str, statistic: float | None, next_domain: str | None) -> None:
        """Close the experience (ended by `reason`): regularizer statistics, probe set, one row of R,
        its name and span in the catalog, checkpoint."""
        nonlocal probes
        ended = progress.experience
        boundaries.ended(reason, statistic, progress)
        record = {"domain": label(progress), **experience_record(progress, reason, statistic)}
        if learner.regularizer is not None:
            update_regularizer(learner, recent, world)
        if world.is_main:
            durable("probe_set", lambda: write_probe_set(probes, state_dir / "metrics" / "probes"))
            probe_sets[ended] = probes
            row = evaluate_row(learner, probe_sets, ended, state_dir / "metrics" / "probe_features")
            history.add_row(ended, row, score_baselines(learner, probes, state_dir),
                            {**record, "images": progress.images_in_experience,
                             "images_total": progress.images_total, "time": time.time(),
                             "images_per_second": rate.value})
            durable("catalog_name", lambda: indexer.store.catalog.name_experience(ended, record["domain"], record))
            service.publish_evaluation(history)
            log.info("experience_end", experience=ended, accuracy=row.accuracy, linear=row.linear,
                     baselines=history.baselines[str(ended)], **history.summary())
        progress.experience += 1
        progress.images_in_experience = 0
        progress.domain = next_domain
        progress.first_offsets, progress.started_at = dict(progress.positions), time.time()
        probes = ProbeSet(progress.experience, settings.probe_max_images)
        recent.clear()
        if save("experience") and indexer is not None:
            indexer.new_encoder(ended, ckpt_root / f"exp-{ended:06d}")  # re-embed the store, swap the index

    def interval_due() -> bool:
        return time.monotonic() - last_checkpoint > settings.checkpoint_interval_s

    # ---- the loop
    audit = None
    if settings.audit_trained_ids and world.is_main:
        audit = open(state_dir / "metrics" / "trained_ids.log", "a")  # noqa: SIM115
    recent: deque[torch.Tensor] = deque(maxlen=RECENT_BATCHES)
    last_checkpoint = time.monotonic()
    last_data = time.monotonic()
    rank_domain = progress.domain  # the domain this rank's partitions delivered last
    rate = Throughput()
    trained_here = 0  # stream images this rank trained (its own partitions)
    metrics.experience.set(progress.experience)
    progress.started_at = progress.started_at or time.time()
    service.publish_evaluation(history)
    prefetcher.start()
    exit_code = 0
    mid_iteration = False  # model, buffers, probes and offsets are being changed: a failure leaves them out of step
    unstepped_wait = 0.0  # the idle wait after the last step is not input wait
    try:
        while True:
            waited = time.perf_counter()
            batch = prefetcher.get(timeout=0.5)
            unstepped_wait += time.perf_counter() - waited  # input wait, once a step follows it
            samples = batch.samples if batch is not None else []
            prepared = batch.prepared if batch is not None else Prepared.of([], 0.0, False)
            train, held_out = prepared.train, prepared.held_out
            replay = buffer.sample(replay_count(len(train), settings.replay_share)) if buffer and train else None
            domain = samples[0].domain if samples else None
            idle = bool(settings.exit_when_idle_s) and time.monotonic() - last_data > settings.exit_when_idle_s \
                and not any(prefetcher.lag().values())
            tick = Tick(records=batch_records(samples), images=len(train),
                        stepped=len(train) + (len(replay) if replay is not None else 0), domain=domain,
                        changed_to=domain if domain is not None and rank_domain not in (None, domain) else None,
                        stop=stop.requested, idle=idle,
                        checkpoint_due=world.is_main and interval_due(), drift=boundaries.pending,
                        lag=prefetcher.lag() if world.distributed and not world.is_main else {})
            agreed = agree(world.exchange(tick), progress.domain)
            rank_domain = domain or rank_domain
            if agreed.stop:
                break
            if not agreed.records:
                if agreed.idle:
                    log.info("idle_exit", idle_seconds=round(time.monotonic() - last_data, 1))
                    break
                continue
            last_data = time.monotonic()
            metrics.records_consumed.labels(settings.topic).inc(agreed.records)  # rank 0 shows the world's
            mid_iteration = True
            ending = boundaries.before_step(agreed, progress)
            if ending is not None:
                end_experience(*ending)  # before the probes: they belong to the new experience
            if progress.domain is None or "header" not in settings.boundaries:
                progress.domain = agreed.domain or progress.domain
            shared = world.gather(Shared.of(train, held_out, batch.positions if batch else {}, world))
            if shared is not None:  # rank 0: every rank's samples go to the store, probes and audit log
                for part in shared:
                    for sample in part.held_out:
                        probes.add(sample.sample_id, sample.image, sample.label, sample.domain)
                    submit(indexer, part.held_out, progress.experience, probe=True)
                    submit(indexer, part.train, progress.experience, probe=False)
                    if audit is not None and part.train:
                        audit.write("".join(f"{s.sample_id}\n" for s in part.train))
                        audit.flush()
                    progress.positions.update(part.positions)
                service.remote_lag = agreed.lag
            elif batch is not None:
                progress.positions.update(batch.positions)
            if agreed.images:
                images = prepared.images if train else standin(recent, learner.preset.resolution)  # (B,3,S,S) u8
                if len(images) + (len(replay) if replay is not None else 0) < 2:
                    images = images.repeat(2, 1, 1, 1)  # BatchNorm needs two samples; a lone straggler
                result = learner.step(images, replay, weight=agreed.weight(world.rank, world.size))
                rate.images_stepped += agreed.stepped
                if rate.first_at is not None:
                    rate.step_seconds += result.seconds
                    rate.input_wait += unstepped_wait
                unstepped_wait = 0.0
                if result.skipped:
                    progress.steps_skipped += 1
                    metrics.steps_skipped.inc()
                    log.warning("step_skipped", reason="non-finite loss", steps_skipped=progress.steps_skipped)
                else:
                    metrics.ssl_loss.set(result.loss)
                    metrics.regularizer_penalty.set(result.penalty)
                metrics.train_step_seconds.observe(result.seconds)
                metrics.images_per_second.set(rate.update(agreed.stepped))
                metrics.images_trained.inc(agreed.images)
                if train:
                    trained_here += len(train)
                    if buffer is not None:
                        buffer.add([s.sample_id for s in train], images, [s.domain for s in train])
                        metrics.replay_buffer_images.set(len(buffer))
                    recent.append(images)
                    if world.is_main:
                        boundaries.observe(learner, images, agreed.images)
                progress.steps += 1
                progress.images_total += agreed.images
                progress.images_in_experience += agreed.images
            service.record_throughput(rate.value, progress.images_total)

            ending = boundaries.after_step(progress)
            if ending is not None:
                end_experience(*ending)
            elif agreed.checkpoint_due if world.distributed else interval_due():  # one process: after the step
                save("interval")
                last_checkpoint = time.monotonic()
            metrics.experience.set(progress.experience)
            mid_iteration = False
            if settings.stop_after_images and progress.images_total >= settings.stop_after_images:
                log.info("stop_after_images", images_total=progress.images_total)
                break
    except Exception:
        log.exception("daemon_failed")
        exit_code = 1
    finally:
        prefetcher.stop()
        if exit_code == 0:
            save("interval")
        elif not mid_iteration and not world.distributed:  # failed between iterations: the state is consistent
            try:
                save("interval")
            except Exception:
                log.exception("checkpoint_after_failure_failed")
        else:  # mid-step (e.g. CUDA OOM): offsets already cover the batch, weights may be half-updated
            log.error("no_checkpoint_after_failure", kept=service.checkpoint_name)
        if server is not None:
            server.stop()
        if indexer is not None:
            indexer.stop()
        if audit is not None:
            audit.close()
        dlq.close()
        source.close()
        if broker is not None:
            broker.stop()
    log.info("stopped", exit_code=exit_code, images_total=progress.images_total, images_trained_here=trained_here,
             images_stepped=rate.images_stepped, train_seconds=round(rate.elapsed(), 3),
             images_per_second_overall=round(rate.images_stepped / max(rate.elapsed(), 1e-9), 2),
             input_wait_seconds=round(rate.input_wait, 3), step_seconds=round(rate.step_seconds, 3),
             drift_seconds=round(boundaries.seconds, 3),
             weights_sha256=weights_digest(learner))
    return exit_code


def durable(what: str, write) -> bool:
    """Run a state-dir write; a failure (disk full…) is logged, not fatal: the checkpoint holds the truth."""
    try:
        write()
        return True
    except Exception as exc:
        log.error("write_failed", what=what, error=str(exc))
        return False


def jpeg_decoder(settings: Settings, limits: DecodeLimits, learner: Learner) -> JpegBatchDecoder | None:
    """The batched nvJPEG decoder on the training GPU, or None to decode JPEGs with Pillow."""
    on_gpu = learner.device.type == "cuda"
    if settings.jpeg_decode == "gpu" and not on_gpu:
        raise UsageError(f"TAILORD_JPEG_DECODE=gpu needs training on CUDA, but it runs on {learner.device.type}")
    if settings.jpeg_decode == "cpu" or not on_gpu:
        return None
    problem = jpeg_decode_problem(learner.device)
    if problem is not None:
        if settings.jpeg_decode == "gpu":
            raise UsageError(f"TAILORD_JPEG_DECODE=gpu: nvJPEG does not work here ({problem})")
        log.warning("jpeg_decode_on_cpu", reason=f"nvJPEG does not work here: {problem}")
        return None
    log.info("jpeg_decode", device=str(learner.device), decoder="torchvision nvJPEG, batched per poll")
    return JpegBatchDecoder(limits, learner.preset.resolution, learner.device)


def submit(indexer: Indexer, samples: list[Sample], experience: int, probe: bool) -> None:
    """Hand samples to the sample store / index thread (never blocks training unless far behind)."""
    if samples:
        indexer.submit([s.sample_id for s in samples], [s.encoded for s in samples], experience,
                       [s.domain for s in samples], [s.label for s in samples], probes=probe)


def replay_dir(rank: int) -> str:
    """A rank's replay buffer folder inside a checkpoint (rank 0's keeps the one-process name)."""
    return "replay" if rank == 0 else f"replay-rank{rank}"


def buffer_writer(settings: Settings, state: tuple[dict, dict] | None):
    """A checkpoint writer for another rank's replay buffer state (`ReplayBuffer.state_dict()`)."""
    def write(path: Path) -> None:
        if state is not None:
            other = build_buffer(settings)
            other.load_state_dict(*state)
            other.save(path.parent)
    return write

