"""The daemon loop: consume -> decode -> batch -> train step -> experience boundaries -> checkpoint.

Read it top to bottom like a training script. `run_rank` sets up (broker, learner resumed
from the last good checkpoint, sample store and index, stream, HTTP), runs `train`, the
loop over batches with one comment per stage, and shuts down. What the loop carries from
one iteration to the next is a `RunState`; when and what to checkpoint is the
`Checkpointer`; `train_step` and `end_experience` are the two things an iteration does.
`streamer`, `learners` and `replay` are libraries; this file is the one place that wires
them together.

Under torchrun every rank runs this loop on its own partitions. Each iteration the ranks
exchange a `Tick` and take the same decisions from it (`World.agree`, one call); rank 0
(the main rank) also owns the checkpoints, the sample store and index, the probe sets and
the HTTP API, and gets the other ranks' samples and positions with each step. With one
process every exchange is with itself: read "rank 0" as "the process".
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog
import torch

from deploy.batches import Prepared, Shared, batch_records, replay_count, standin, stream_batch_size
from deploy.boundaries import DRIFT_FILE, Boundaries, experience_record, label
from deploy.checkpoints import Checkpoint, clean_temporaries, load_latest, write_checkpoint
from deploy.compute_turns import ComputeTurns
from deploy.errors import UsageError
from deploy.evaluate import FrozenModel, keep_untrained
from deploy.evaluator import KIND, MAX_PENDING, Evaluation, EvaluationJob, Evaluator, requeue
from deploy.history import History
from deploy.http_api import HttpServer
from deploy.index_budget import ComputeBudget
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
from deploy.world import Agreement, Tick, World
from learners.train_step import StepResult
from replay.balanced import BalancedBuffer
from replay.buffer import ReservoirBuffer
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

RECENT_BATCHES = 8  # recent stream batches kept for the regularizer's experience-end statistics
EXIT_FLUSH_S = 120.0  # at a clean exit, how long pending rows of R may take (the rest stay pending in the checkpoint)

Buffer = ReservoirBuffer | BalancedBuffer


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
    join_world(settings, world)
    metrics = Metrics()
    prepare_state_dir(settings.state_dir, world)

    # ---- broker: the configured cluster, or an embedded one on a free port
    broker, bootstrap, client = start_broker(settings)
    if not connect(settings, world, stop, bootstrap, client):
        return 0  # stopped while waiting for the broker

    # ---- learner, replay buffer, probes and progress: fresh, or from the last good checkpoint
    checkpoint, learner, buffer, boundaries, state = restore(settings, world, metrics)

    # ---- sample store + FAISS index (a background thread), and the snapshot engine on top of them (rank 0)
    limits = DecodeLimits(max_record_bytes=settings.max_record_bytes, max_pixels=settings.max_pixels)
    decode_batch = jpeg_decoder(settings, limits, learner)
    turns = ComputeTurns(enabled=learner.device.type == "cpu")  # on a CPU the step and the indexer take turns
    indexer, snapshots = start_indexer(settings, world, metrics, learner, limits, turns)
    evaluator = start_evaluator(settings, world, metrics, learner, state)

    # ---- stream: this rank's partitions, seeked to the checkpoint's offsets, decoded off the training thread
    dlq = DeadLetterQueue.connect(bootstrap, client)
    source, prefetcher = open_stream(settings, world, metrics, learner, state.progress, dlq,
                                     (bootstrap, client), limits, decode_batch, replay=bool(buffer))

    # ---- HTTP (rank 0): metrics, health, admin
    service = DaemonService(settings, metrics, learner, state.progress, state.history, prefetcher,
                            checkpoint_name=checkpoint.name if checkpoint else None)
    service.indexer, service.snapshots, service.evaluator = indexer, snapshots, evaluator
    server = start_http(settings, world, service)

    # ---- the loop; whatever ends it, the checkpoint the policy allows, then everything closes
    checkpointer = Checkpointer(settings, world, metrics, learner, buffer, boundaries, state, service, prefetcher,
                                indexer)
    daemon = Daemon(settings, world, metrics, stop, learner, buffer, boundaries, state, checkpointer, prefetcher,
                    service, indexer, evaluator, turns, open_audit(settings, world), (server, dlq, source, broker))
    state.start()
    metrics.experience.set(state.progress.experience)
    service.publish_evaluation(state.history)
    prefetcher.start()
    exit_code = 0
    try:
        train(daemon)
    except Exception:
        log.exception("daemon_failed")
        exit_code = 1
    finally:
        shut_down(daemon, exit_code)
    log_stopped(daemon, exit_code)
    return exit_code


# ---------------------------------------------------------------- set-up


def join_world(settings: Settings, world: World) -> None:
    """Under torchrun: tag this rank's log lines; the ranks must share one Kafka cluster."""
    if world.distributed:
        structlog.contextvars.bind_contextvars(rank=world.rank)
        if not settings.bootstrap_servers:
            raise UsageError("several ranks need a shared Kafka cluster: set TAILORD_BOOTSTRAP_SERVERS")


def prepare_state_dir(state_dir: Path, world: World) -> None:
    """`<state>/metrics` exists; rank 0 removes checkpoints a crash left half-written."""
    (state_dir / "metrics").mkdir(parents=True, exist_ok=True)
    if world.is_main:
        clean_temporaries(state_dir / "checkpoints")


def start_broker(settings: Settings) -> tuple[EmbeddedBroker | None, str, dict]:
    """(embedded broker or None, bootstrap address, Kafka client config)."""
    broker = None
    bootstrap = settings.bootstrap_servers
    if not bootstrap:
        broker = EmbeddedBroker()
        broker.start()
        bootstrap = broker.bootstrap
        log.info("embedded_broker_started", bootstrap=bootstrap,
                 note="no TAILORD_BOOTSTRAP_SERVERS set; produce to this address")
    return broker, bootstrap, client_config(kafka_security(settings))


def connect(settings: Settings, world: World, stop: StopFlag, bootstrap: str, client: dict) -> bool:
    """Wait for the broker (False: a stop came first); rank 0 makes sure the topic has a partition per rank."""
    while not wait_for_broker(bootstrap, timeout=10, **client):
        log.warning("waiting_for_broker", bootstrap=bootstrap)
        if stop.requested:
            return False
    if world.is_main:
        ensure_topic(bootstrap, settings.topic, max(settings.topic_partitions, world.size), **client)
    world.barrier()
    return True


def restore(settings: Settings, world: World, metrics: Metrics
            ) -> tuple[Checkpoint | None, Learner, Buffer | None, Boundaries, RunState]:
    """The learner, replay buffer, drift detector and loop state: fresh, or from the last good
    checkpoint (rank 0 verifies it, every rank resumes from it)."""
    checkpoint = world.broadcast(load_latest(settings.state_dir / "checkpoints") if world.is_main else None)
    # same backbone as the checkpoint (else UsageError); TAILORD_INIT_WEIGHTS only when fresh
    learner = build_learner(settings, world, resume=checkpoint.manifest if checkpoint is not None else None)
    buffer = build_buffer(settings) if learner.use_replay else None
    boundaries = Boundaries(settings, metrics)
    if checkpoint is not None:
        progress, history, probes = resume(settings, world, checkpoint, learner, buffer, boundaries)
    else:
        log.info("fresh_start", state_dir=str(settings.state_dir))
        progress, history, probes = Progress(), History(), ProbeSet(1, settings.probe_max_images)
        if world.is_main:
            # every probe set's second floor: the encoder before tailord trained it (the starting weights if set)
            durable("untrained", lambda: keep_untrained(learner, settings.state_dir))
    probe_sets = read_probe_sets(settings.state_dir / "metrics" / "probes")
    probe_sets = {j: p for j, p in probe_sets.items() if j < progress.experience}
    pending = checkpoint.manifest.get("pending_evaluations", []) if checkpoint is not None else []
    log.info("learner", device=str(learner.device), backbone=learner.describe()["backbone"]["name"],
             **learner.describe()["backbone"]["kwargs"],
             preset=learner.preset.name, method=settings.method, strategy=settings.strategy,
             batch_size=learner.preset.batch_size, resolution=learner.preset.resolution)
    return checkpoint, learner, buffer, boundaries, RunState(progress, history, probes, probe_sets, pending)


def resume(settings: Settings, world: World, checkpoint: Checkpoint, learner: Learner, buffer: Buffer | None,
           boundaries: Boundaries) -> tuple[Progress, History, ProbeSet]:
    """Load a verified checkpoint into the learner, buffer and detector; its (progress, history, probes)."""
    load_learner_state(learner, checkpoint.path)
    boundaries.load(checkpoint.path)
    progress = Progress.from_json(checkpoint.manifest["progress"])
    progress.positions = read_offsets(checkpoint.path / "offsets.json")
    history = History.from_json(checkpoint.manifest["history"])
    if buffer is not None and (checkpoint.path / replay_dir(world.rank)).is_dir():
        buffer.load(checkpoint.path / replay_dir(world.rank))
    probes = ProbeSet(1, settings.probe_max_images)
    if (checkpoint.path / "probes.safetensors").is_file():
        probes = ProbeSet.load(checkpoint.path / "probes.safetensors")
    log.info("resumed", checkpoint=checkpoint.name, experience=progress.experience,
             images_total=progress.images_total, positions=progress.positions)
    return progress, history, probes


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


def start_indexer(settings: Settings, world: World, metrics: Metrics, learner: Learner, limits: DecodeLimits,
                  turns: ComputeTurns) -> tuple[Indexer | None, SnapshotEngine | None]:
    """Rank 0: the sample store + index thread (embedding in `turns` with the step), and the
    snapshot engine; (None, None) on the other ranks."""
    if not world.is_main:
        return None, None

    def publish_index(sizes: dict[int, int]) -> None:
        metrics.index_vectors.clear()
        for version, count in sizes.items():
            metrics.index_vectors.labels(str(version)).set(count)

    indexer = Indexer(settings.state_dir, settings.store_max_bytes, settings.index_options(),
                      learner.backbone.feature_dim, learner.device, learner.preset.resolution, publish_index,
                      limits=limits, seed=settings.seed, budget=ComputeBudget(settings.indexer_share, turns=turns))
    metrics.watch_index(indexer.upkeep)
    indexer.start()
    snapshots = SnapshotEngine(settings.state_dir, indexer.store, indexer.index, learner.device,
                               learner.preset.resolution, metrics, settings.targets_dir, limits,
                               sept_child=(settings.snapshot_threads, settings.snapshot_niceness),
                               rerank_pool=settings.snapshot_rerank_pool, turns=turns,
                               relevance_k=settings.snapshot_relevance_k)
    return indexer, snapshots


def start_evaluator(settings: Settings, world: World, metrics: Metrics, learner: Learner,
                    state: RunState) -> Evaluator | None:
    """Rank 0: the thread that scores experience ends, with the rows a checkpoint left pending queued."""
    if not world.is_main:
        return None
    evaluator = Evaluator(settings.state_dir, ComputeBudget(settings.evaluation_share, kinds=(KIND,)), metrics)
    evaluator.start()
    lost = requeue(evaluator, learner, settings.state_dir / "checkpoints", state.pending_rows, state.probe_sets)
    state.pending_rows = [p for p in state.pending_rows if p["experience"] not in lost]
    return evaluator


def open_stream(settings: Settings, world: World, metrics: Metrics, learner: Learner, progress: Progress,
                dlq: DeadLetterQueue, kafka: tuple[str, dict], limits: DecodeLimits,
                decode_batch: JpegBatchDecoder | None, replay: bool) -> tuple[KafkaSource, Prefetcher]:
    """This rank's partitions seeked to `progress.positions`, and the prefetcher that decodes and
    batches them on its own threads (rejected records counted, logged and sent to the DLQ)."""
    def decode(record: RawRecord):
        return decode_record(record.value, record.headers, limits, learner.preset.resolution)

    def on_reject(record: RawRecord, error: RejectedRecord) -> None:
        metrics.records_consumed.labels(settings.topic).inc()
        metrics.records_rejected.labels(error.reason).inc()
        log.warning("record_rejected", reason=error.reason, detail=error.detail[:200],
                    partition=record.partition, offset=record.offset)
        dlq.send(record, error.reason, error.detail)

    bootstrap, client = kafka
    try:
        source = KafkaSource(bootstrap, settings.topic, settings.group_id, client,
                             max_record_bytes=settings.max_record_bytes,
                             shard=(world.rank, world.size) if world.distributed else None)
    except ValueError as exc:  # fewer partitions than ranks, or no such topic: a configuration error
        raise UsageError(str(exc)) from exc
    source.seek(progress.positions)
    # an empty replay buffer counts as none: the first run after a fresh start streams whole batches
    stream_batch = stream_batch_size(learner.preset.batch_size, settings.replay_share if replay else 0.0)
    pin = learner.device.type == "cuda"
    prefetcher = Prefetcher(source, decode, on_reject, batch_size=stream_batch,
                            split_on_domain="header" in settings.boundaries, workers=settings.decode_workers,
                            prepare=lambda samples: Prepared.of(samples, settings.probe_fraction, pin),
                            decode_batch=decode_batch)
    if world.distributed:
        log.info("rank_partitions", partitions=source.partitions, world_size=world.size)
    return source, prefetcher


def start_http(settings: Settings, world: World, service: DaemonService) -> HttpServer | None:
    """Rank 0 serves /metrics, /healthz and /admin; the other ranks serve nothing."""
    if not world.is_main:
        return None
    server = service.start_http()
    log.info("http_listening", url=f"http://{settings.http_host}:{server.port}", metrics="/metrics",
             admin="/admin/status")
    return server


def open_audit(settings: Settings, world: World) -> IO[str] | None:
    """Rank 0's `metrics/trained_ids.log` (TAILORD_AUDIT_TRAINED_IDS): every trained sample id, one a line."""
    if settings.audit_trained_ids and world.is_main:
        return open(settings.state_dir / "metrics" / "trained_ids.log", "a")  # noqa: SIM115 - closed by shut_down
    return None


# ---------------------------------------------------------------- what the loop carries


@dataclass
class RunState:
    """What the loop carries from one iteration to the next. `progress` goes into every
    checkpoint; the rest is this process's and starts afresh at each start."""

    progress: Progress
    history: History  # the accuracy matrix R and the experiences' records
    probes: ProbeSet  # the probe set of the experience in progress
    probe_sets: dict[int, ProbeSet]  # the finished experiences' probe sets, by experience
    pending_rows: list[dict] = field(default_factory=list)  # {experience, record} of rows not yet scored (checkpointed)
    recent: deque[torch.Tensor] = field(default_factory=lambda: deque(maxlen=RECENT_BATCHES))  # stream batches
    rate: Throughput = field(default_factory=Throughput)
    last_checkpoint: float = 0.0  # time.monotonic() of the last interval checkpoint (or of the start)
    last_data: float = 0.0  # time.monotonic() of the last iteration with data on some rank
    rank_domain: str | None = None  # the domain this rank's partitions delivered last
    trained_here: int = 0  # stream images this rank trained (its own partitions)
    mid_iteration: bool = False  # model, buffers, probes and offsets are being changed: a failure leaves them out of step
    unstepped_wait: float = 0.0  # input wait since the last step (the idle wait after the last step is not input wait)

    def start(self) -> None:
        """The loop starts now: the checkpoint interval and the idle time count from here."""
        self.last_checkpoint = time.monotonic()
        self.last_data = time.monotonic()
        self.rank_domain = self.progress.domain
        self.progress.started_at = self.progress.started_at or time.time()

    def interval_due(self, interval_s: float) -> bool:
        """More than `interval_s` since the last interval checkpoint."""
        return time.monotonic() - self.last_checkpoint > interval_s

    def idle(self, exit_when_idle_s: float, lag: Callable[[], dict[int, int]]) -> bool:
        """This rank would exit for idleness: no data for `exit_when_idle_s` (0: never) and no lag."""
        return bool(exit_when_idle_s) and time.monotonic() - self.last_data > exit_when_idle_s \
            and not any(lag().values())

    def count_step(self, result: StepResult, stepped: int) -> None:
        """Throughput bookkeeping of one step of `stepped` images (world-wide) and a skipped step's count."""
        self.rate.images_stepped += stepped
        if self.rate.first_at is not None:
            self.rate.step_seconds += result.seconds
            self.rate.input_wait += self.unstepped_wait
        self.unstepped_wait = 0.0
        if result.skipped:
            self.progress.steps_skipped += 1

    def advance(self, images: int) -> None:
        """One step done on `images` stream images (all ranks together)."""
        self.progress.steps += 1
        self.progress.images_total += images
        self.progress.images_in_experience += images

    def follow_domain(self, domain: str | None, header_boundaries: bool) -> None:
        """The experience takes the agreed domain unless domain headers mark its boundaries (then
        only its first domain)."""
        if self.progress.domain is None or not header_boundaries:
            self.progress.domain = domain or self.progress.domain

    def start_experience(self, next_domain: str | None, probe_max_images: int) -> None:
        """The next experience begins: counters, domain, first offsets, an empty probe set, no recent batches."""
        progress = self.progress
        progress.experience += 1
        progress.images_in_experience = 0
        progress.domain = next_domain
        progress.first_offsets, progress.started_at = dict(progress.positions), time.time()
        self.probes = ProbeSet(progress.experience, probe_max_images)
        self.recent.clear()


@dataclass
class Daemon:
    """What set-up built, as the loop uses it (`indexer`, `audit` and the HTTP server: rank 0 only)."""

    settings: Settings
    world: World
    metrics: Metrics
    stop: StopFlag
    learner: Learner
    buffer: Buffer | None
    boundaries: Boundaries
    state: RunState
    checkpointer: Checkpointer
    prefetcher: Prefetcher
    service: DaemonService
    indexer: Indexer | None
    evaluator: Evaluator | None
    turns: ComputeTurns  # the step takes its turn on the cores with the indexer's embedding
    audit: IO[str] | None
    closing: tuple[HttpServer | None, DeadLetterQueue, KafkaSource, EmbeddedBroker | None]  # for shut_down


# ---------------------------------------------------------------- the loop


def train(d: Daemon) -> None:
    """One iteration per batch (or per empty poll) until a stop, idleness or TAILORD_STOP_AFTER_IMAGES."""
    state, progress = d.state, d.state.progress
    while True:
        # ---- this rank's next batch and its replay images; every rank's tick, the same decisions on all
        batch = next_batch(d)
        if d.evaluator is not None:
            apply_evaluations(d, d.evaluator.finished())  # rows of R scored off the loop since the last iteration
        agreed = d.world.agree(tick(d, batch), progress.domain)
        state.rank_domain = batch.domain or state.rank_domain
        if agreed.stop:
            break
        if not agreed.records:  # no data on any rank: exit once idle long enough, else poll again
            for budget in upkeep_budgets(d):
                budget.rest()  # the cores are free for the indexer and the evaluator
            if agreed.idle:
                log.info("idle_exit", idle_seconds=round(time.monotonic() - state.last_data, 1))
                break
            continue
        state.last_data = time.monotonic()
        d.metrics.records_consumed.labels(d.settings.topic).inc(agreed.records)  # rank 0 shows the world's
        state.mid_iteration = True
        # ---- a domain header change or a drift ends the experience before this batch (its probes are the next one's)
        ending = d.boundaries.before_step(agreed, progress)
        if ending is not None:
            end_experience(d, *ending)
        state.follow_domain(agreed.domain, "header" in d.settings.boundaries)
        # ---- samples to the store and index, probes to the probe set, ids to the audit log; offsets forward
        keep_samples(d, batch, agreed)
        # ---- the train step (a rank without images this iteration steps on a stand-in at weight 0)
        if agreed.images:
            train_step(d, batch, agreed)
        d.service.record_throughput(state.rate.value, progress.images_total)
        d.service.torch_threads = torch.get_num_threads()  # this thread's: another library's OpenMP call can change it
        # ---- TAILORD_EXPERIENCE_IMAGES reached: the experience ends; else an interval checkpoint if due
        ending = d.boundaries.after_step(progress)
        if ending is not None:
            end_experience(d, *ending)
        elif d.checkpointer.due_after_step(agreed):
            d.checkpointer.interval()
        d.metrics.experience.set(progress.experience)
        state.mid_iteration = False
        if done(d.settings, progress):
            break


@dataclass
class Batch:
    """This rank's batch of one iteration (empty when the prefetcher had none within 0.5 s)."""

    samples: list[Sample]
    prepared: Prepared
    positions: dict[int, int]  # partition -> next offset after this batch
    replay: torch.Tensor | None = None  # (R,3,S,S) uint8 replay images stepped with it

    @property
    def domain(self) -> str | None:
        return self.samples[0].domain if self.samples else None

    @property
    def stepped(self) -> int:
        """Images through this rank's step: stream + replay."""
        return len(self.prepared.train) + (len(self.replay) if self.replay is not None else 0)


def next_batch(d: Daemon) -> Batch:
    """The prefetcher's next batch (waiting up to 0.5 s), with replay images drawn for it."""
    waited = time.perf_counter()
    got = d.prefetcher.get(timeout=0.5)
    d.state.unstepped_wait += time.perf_counter() - waited  # input wait, once a step follows it
    batch = Batch(got.samples, got.prepared, got.positions) if got is not None \
        else Batch([], Prepared.of([], 0.0, False), {})
    train = batch.prepared.train
    if d.buffer and train:  # an empty buffer has nothing to replay yet
        batch.replay = d.buffer.sample(replay_count(len(train), d.settings.replay_share))
    return batch


def tick(d: Daemon, batch: Batch) -> Tick:
    """What this rank tells the others this iteration."""
    state, world = d.state, d.world
    idle = state.idle(d.settings.exit_when_idle_s, d.prefetcher.lag)
    return Tick(records=batch_records(batch.samples), images=len(batch.prepared.train), stepped=batch.stepped,
                domain=batch.domain, changed_to=domain_change(batch.domain, state.rank_domain),
                stop=d.stop.requested, idle=idle,
                checkpoint_due=world.is_main and d.checkpointer.interval_due(), drift=d.boundaries.pending,
                lag=d.prefetcher.lag() if world.distributed and not world.is_main else {})  # rank 0 serves it


def domain_change(domain: str | None, rank_domain: str | None) -> str | None:
    """`domain` when this rank's stream switched to it from another one, else None."""
    return domain if domain is not None and rank_domain not in (None, domain) else None


def keep_samples(d: Daemon, batch: Batch, agreed: Agreement) -> None:
    """Every rank's samples to rank 0, which keeps them (`keep_part`); the other ranks only move
    their offsets forward."""
    shared = d.world.gather(Shared.of(batch.prepared.train, batch.prepared.held_out, batch.positions, d.world))
    if shared is None:
        d.state.progress.positions.update(batch.positions)
        return
    for part in shared:
        keep_part(d, part)
    d.service.remote_lag = agreed.lag


def keep_part(d: Daemon, part: Shared) -> None:
    """One rank's samples: probes to this experience's probe set, all of them to the sample store
    and index, trained ids to the audit log; its offsets forward."""
    progress = d.state.progress
    for sample in part.held_out:
        d.state.probes.add(sample.sample_id, sample.image, sample.label, sample.domain, progress.images_in_experience)
    submit(d.indexer, part.held_out, progress.experience, probe=True)
    submit(d.indexer, part.train, progress.experience, probe=False)
    if d.audit is not None and part.train:
        d.audit.write("".join(f"{s.sample_id}\n" for s in part.train))
        d.audit.flush()
    progress.positions.update(part.positions)


def submit(indexer: Indexer, samples: list[Sample], experience: int, probe: bool) -> None:
    """Hand samples to the sample store / index thread (never blocks training unless far behind)."""
    if samples:
        indexer.submit([s.sample_id for s in samples], [s.encoded for s in samples], experience,
                       [s.domain for s in samples], [s.label for s in samples], probes=probe)


def train_step(d: Daemon, batch: Batch, agreed: Agreement) -> None:
    """One optimizer step on this rank's stream and replay images (loss weighted so that DDP's
    gradient mean is over all ranks' images), then its metrics and bookkeeping."""
    state, learner, train = d.state, d.learner, batch.prepared.train
    images = batch.prepared.images if train else standin(state.recent, learner.preset.resolution)  # (B,3,S,S) u8
    if len(images) + (len(batch.replay) if batch.replay is not None else 0) < 2:
        images = images.repeat(2, 1, 1, 1)  # BatchNorm needs two samples; a lone straggler
    with d.turns:
        result = learner.step(images, batch.replay, weight=agreed.weight(d.world.rank, d.world.size))
    for budget in upkeep_budgets(d):
        budget.trained(result.seconds)  # the indexer's and the evaluator's compute shares are of this
    state.count_step(result, agreed.stepped)
    report_step(d.metrics, state, result, agreed)
    if train:
        state.trained_here += len(train)
        if d.buffer is not None:
            d.buffer.add([s.sample_id for s in train], images, [s.domain for s in train])
            d.metrics.replay_buffer_images.set(len(d.buffer))
        state.recent.append(images)
        if d.world.is_main:
            with d.turns:  # its embedding, like the step's, never beside the indexer's
                d.boundaries.observe(learner, images, agreed.images)  # the drift detector's sample
    state.advance(agreed.images)


def upkeep_budgets(d: Daemon) -> list[ComputeBudget]:
    """The compute budgets of the work beside training (rank 0): the indexer's, the evaluator's."""
    return [part.budget for part in (d.indexer, d.evaluator) if part is not None]


def report_step(metrics: Metrics, state: RunState, result: StepResult, agreed: Agreement) -> None:
    """A step's loss, time and throughput to the metrics (a skipped step: its count and a warning)."""
    if result.skipped:
        metrics.steps_skipped.inc()
        log.warning("step_skipped", reason="non-finite loss", steps_skipped=state.progress.steps_skipped)
    else:
        metrics.ssl_loss.set(result.loss)
        metrics.regularizer_penalty.set(result.penalty)
    metrics.train_step_seconds.observe(result.seconds)
    metrics.images_per_second.set(state.rate.update(agreed.stepped))
    metrics.images_trained.inc(agreed.images)


def done(settings: Settings, progress: Progress) -> bool:
    """TAILORD_STOP_AFTER_IMAGES reached (logged)."""
    if settings.stop_after_images and progress.images_total >= settings.stop_after_images:
        log.info("stop_after_images", images_total=progress.images_total)
        return True
    return False


# ---------------------------------------------------------------- the experience end


def end_experience(d: Daemon, reason: str, statistic: float | None, next_domain: str | None) -> None:
    """Close the experience (ended by `reason`): regularizer statistics, probe set, its name and span
    in the catalog, its row of R queued for the evaluator; open the next one; checkpoint; re-embed the store."""
    progress = d.state.progress
    ended = progress.experience
    handed_on = d.boundaries.ended(reason, statistic, progress)
    record = {"domain": label(progress), **experience_record(progress, reason, statistic),
              "images_after_change": handed_on}
    if d.learner.regularizer is not None:
        update_regularizer(d.learner, d.state.recent, d.world)  # every rank: the ranks average them
    # after a drift's change point, the samples and probes are the next experience's
    tail = d.state.probes.split(progress.images_in_experience - handed_on, ended + 1) if handed_on else None
    if d.world.is_main:
        submit_evaluation(d, ended, record)
        if handed_on and d.indexer is not None:
            d.indexer.hand_over(ended, ended + 1, handed_on)
    d.state.start_experience(next_domain, d.settings.probe_max_images)
    if tail is not None:
        d.state.probes = tail
    if d.checkpointer.save("experience") and d.indexer is not None:
        # re-embed the store with the new encoder, swap the index
        d.indexer.new_encoder(ended, d.checkpointer.root / checkpoint_name("experience", ended, progress.steps))


def submit_evaluation(d: Daemon, ended: int, record: dict) -> None:
    """Rank 0: keep the ended experience's probe set, name the experience in the catalog, and queue
    its row of R with a copy of the model now (scored off the loop; `apply_evaluations` adds it)."""
    state, state_dir, progress = d.state, d.settings.state_dir, d.state.progress
    durable("probe_set", lambda: write_probe_set(state.probes, state_dir / "metrics" / "probes"))
    state.probe_sets[ended] = state.probes
    record = {**record, "images": progress.images_in_experience, "images_total": progress.images_total,
              "time": time.time(), "images_per_second": state.rate.value}
    durable("catalog_name", lambda: d.indexer.store.catalog.name_experience(ended, record["domain"], record))
    d.evaluator.wait_below(MAX_PENDING)  # a row may lag, the queue of model copies may not grow without bound
    d.evaluator.submit(EvaluationJob(ended, FrozenModel.of(d.learner), dict(state.probe_sets), record))
    state.pending_rows.append({"experience": ended, "record": record})


def apply_evaluations(d: Daemon, evaluations: list[Evaluation]) -> None:
    """Rank 0: finished rows of R into the history (the next checkpoint keeps them; until then its
    `pending_evaluations` would score them again after a crash), the gauges, `metrics/`, and the
    `experience_end` line."""
    history = d.state.history
    for done in evaluations:
        history.add_row(done.experience, done.row, done.baselines, done.record)
        d.state.pending_rows = [p for p in d.state.pending_rows if p["experience"] != done.experience]
        log.info("experience_end", experience=done.experience, accuracy=done.row.accuracy, linear=done.row.linear,
                 baselines=history.baselines[str(done.experience)], evaluation_seconds=round(done.seconds, 3),
                 **history.summary())
    if evaluations:
        d.service.publish_evaluation(history)
        durable("metrics_export", lambda: history.export(d.settings.state_dir / "metrics", d.service.throughput))


# ---------------------------------------------------------------- checkpoints


def checkpoint_name(kind: str, finished: int, steps: int) -> str:
    """`exp-000003` at the end of experience 3; `exp-000003-step-000000420` after it (interval, exit)."""
    return f"exp-{finished:06d}" if kind == "experience" else f"exp-{finished:06d}-step-{steps:09d}"


def exit_checkpoint(exit_code: int, mid_iteration: bool, distributed: bool) -> str:
    """The checkpoint a loop that ended gets: "save" after a clean stop; "try" after a failure
    between iterations of one process (the state is consistent; a failed write is only logged);
    "none" after a failure mid-iteration (e.g. CUDA OOM: offsets already cover the batch, weights
    may be half-updated) or on several ranks (the others would not join the save)."""
    if exit_code == 0:
        return "save"
    if not mid_iteration and not distributed:
        return "try"
    return "none"


@dataclass
class Checkpointer:
    """Checkpoints everything that must agree: model, optimizer, buffers, probes, progress, offsets.

    When: every TAILORD_CHECKPOINT_INTERVAL_S (`due_after_step`, `interval`), at every experience
    end (`end_experience`), and when the loop ends (`at_exit`). Every rank calls `save` at the same
    iteration; rank 0 writes, with the other ranks' replay buffers, and every rank then commits
    its partitions' offsets to the consumer group.
    """

    settings: Settings
    world: World
    metrics: Metrics
    learner: Learner
    buffer: Buffer | None
    boundaries: Boundaries
    state: RunState
    service: DaemonService
    prefetcher: Prefetcher
    indexer: Indexer | None

    @property
    def root(self) -> Path:
        return self.settings.state_dir / "checkpoints"

    def interval_due(self) -> bool:
        return self.state.interval_due(self.settings.checkpoint_interval_s)

    def due_after_step(self, agreed: Agreement) -> bool:
        """An interval checkpoint now? One process reads its timer after the step; several ranks
        take rank 0's reading at the tick, so that all of them save at the same iteration."""
        return agreed.checkpoint_due if self.world.distributed else self.interval_due()

    def interval(self) -> None:
        """The interval checkpoint; the interval counts again from now (even if the write failed)."""
        self.save("interval")
        self.state.last_checkpoint = time.monotonic()

    def at_exit(self, exit_code: int, mid_iteration: bool) -> None:
        """The last checkpoint, as `exit_checkpoint` decides."""
        policy = exit_checkpoint(exit_code, mid_iteration, self.world.distributed)
        if policy == "save":
            self.save("interval")
        elif policy == "try":
            try:
                self.save("interval")
            except Exception:
                log.exception("checkpoint_after_failure_failed")
        else:
            log.error("no_checkpoint_after_failure", kept=self.service.checkpoint_name)

    def save(self, kind: str) -> bool:
        """Write a checkpoint of `kind` ("experience" or "interval"); False if the write failed
        (ENOSPC and friends: logged and counted, training goes on, the previous one stays valid)."""
        started = time.perf_counter()
        other_buffers = self.world.gather_others(lambda: self.buffer.state_dict() if self.buffer is not None else None)
        progress = self.state.progress
        if not self.world.is_main:
            self.prefetcher.request_commit(progress.positions)
            return True
        finished = progress.experience - 1
        name = checkpoint_name(kind, finished, progress.steps)
        writers = self.writers(other_buffers)
        manifest = {"kind": kind, "experience": finished, "progress": progress.to_json(),
                    "history": self.state.history.to_json(), "pending_evaluations": self.state.pending_rows,
                    "topic": self.settings.topic,
                    "strategy": self.settings.strategy, "world_size": self.world.size, **self.learner.describe()}
        try:
            saved = write_checkpoint(self.root, name, writers, manifest)
        except Exception as exc:  # safetensors wraps OSErrors
            self.metrics.checkpoint_errors.labels(type(exc).__name__).inc()
            log.error("checkpoint_failed", checkpoint=name, error=str(exc),
                      kept=self.service.checkpoint_name, note="the previous checkpoint stays valid")
            return False
        elapsed = time.perf_counter() - started
        self.published(saved.name, elapsed)
        log.info("checkpoint", checkpoint=name, kind=kind, seconds=round(elapsed, 3),
                 images_total=progress.images_total)
        return True

    def writers(self, other_buffers: list) -> dict:
        """The checkpoint's files: the learner's, offsets, probes, the drift detector's, every rank's replay buffer."""
        settings, progress, probes, buffer = self.settings, self.state.progress, self.state.probes, self.buffer
        writers = learner_writers(self.learner)
        writers["offsets.json"] = lambda p: write_offsets(p, settings.topic, progress.positions)
        writers["probes.safetensors"] = lambda p: probes.save(p)
        if self.boundaries.detector is not None:
            writers[DRIFT_FILE] = self.boundaries.save
        if buffer is not None:
            writers[f"{replay_dir(0)}/buffer"] = lambda p: buffer.save(p.parent)  # buffer.{safetensors,json}
            for rank, state in enumerate(other_buffers, start=1):
                writers[f"{replay_dir(rank)}/buffer"] = buffer_writer(settings, state)
        return writers

    def published(self, name: str, elapsed: float) -> None:
        """After a write: metrics, retention, the metrics export, and the offsets committed."""
        settings, state_dir, metrics = self.settings, self.settings.state_dir, self.metrics
        metrics.checkpoint_seconds.observe(elapsed)
        metrics.last_checkpoint_timestamp.set(time.time())
        self.service.checkpoint_name = name
        prune_checkpoints(state_dir, settings.keep_experiences, name, settings.keep_distinct,
                          self.indexer.index.centroids)
        metrics.state_dir_bytes.set(directory_bytes(state_dir))
        if not durable("metrics_export", lambda: self.state.history.export(state_dir / "metrics",
                                                                           self.service.throughput)):
            metrics.checkpoint_errors.labels("metrics_export").inc()
        self.prefetcher.request_commit(self.state.progress.positions)


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


# ---------------------------------------------------------------- shut-down


def shut_down(d: Daemon, exit_code: int) -> None:
    """Stop the prefetcher, take the last checkpoint the policy allows, close everything."""
    server, dlq, source, broker = d.closing
    d.prefetcher.stop()
    if d.evaluator is not None:  # the pending rows of R into the last checkpoint, if they are quick enough
        if exit_code == 0 and not d.evaluator.flush(EXIT_FLUSH_S):
            log.warning("evaluation_pending_at_exit", pending=d.evaluator.pending,
                        note="scored after the next start, with their experience checkpoints")
        apply_evaluations(d, d.evaluator.finished())
    d.checkpointer.at_exit(exit_code, d.state.mid_iteration)
    if d.evaluator is not None:
        d.evaluator.stop()
    if server is not None:
        server.stop()
    if d.indexer is not None:
        d.indexer.stop()
    if d.audit is not None:
        d.audit.close()
    dlq.close()
    source.close()
    if broker is not None:
        broker.stop()


def log_stopped(d: Daemon, exit_code: int) -> None:
    """The last line: totals of this process (throughput from the end of its first step) and the weights' digest."""
    rate, progress = d.state.rate, d.state.progress
    log.info("stopped", exit_code=exit_code, images_total=progress.images_total,
             images_trained_here=d.state.trained_here,
             images_stepped=rate.images_stepped, train_seconds=round(rate.elapsed(), 3),
             images_per_second_overall=round(rate.images_stepped / max(rate.elapsed(), 1e-9), 2),
             input_wait_seconds=round(rate.input_wait, 3), step_seconds=round(rate.step_seconds, 3),
             drift_seconds=round(d.boundaries.seconds, 3),
             weights_sha256=weights_digest(d.learner))


def durable(what: str, write: Callable[[], object]) -> bool:
    """Run a state-dir write; a failure (disk full…) is logged, not fatal: the checkpoint holds the truth."""
    try:
        write()
        return True
    except Exception as exc:
        log.error("write_failed", what=what, error=str(exc))
        return False
