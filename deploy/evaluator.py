"""Experience-end evaluation off the training thread (docs/design.md, "deploy — evaluation at each experience end").

At an experience end the loop hands the evaluator a frozen copy of the model and the
finished probe sets (`EvaluationJob`). A background thread scores them with the protocol
of `deploy/evaluate.py`: one row of the accuracy matrices, then the new probe set's floors.
It works one probe set at a time within its own compute budget, a share of the training
step's seconds (`TAILORD_EVALUATION_SHARE`). The loop applies finished rows at its next
iteration, in experience order (`finished`).

A row lags its experience by at most one experience: while a second job waits behind the
one being scored, the budget does not bind. The loop stops at an experience end while
`MAX_PENDING` jobs wait (`wait_below`), so a stream of tiny experiences cannot queue model
copies without bound. `flush` lifts the budget and waits. A job not finished when the
daemon stops is in the checkpoint's `pending_evaluations`; after a restart it is
re-queued with the weights of its experience checkpoint (`requeue`).

Usage:
    evaluator = Evaluator(state_dir, ComputeBudget(0.05, kinds=("evaluate",)), metrics)
    evaluator.start()
    evaluator.submit(EvaluationJob(3, FrozenModel.of(learner), probe_sets, record))
    for done in evaluator.finished():  # the training loop, every iteration
        history.add_row(done.experience, done.row, done.baselines, done.record)
    evaluator.flush(timeout=120); evaluator.stop()
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog
from safetensors.torch import load_file

from deploy.evaluate import EvalRow, FrozenModel, evaluate_row, score_baselines
from deploy.index_budget import POLL_S, ComputeBudget
from deploy.learner import Learner
from deploy.metrics import Metrics
from deploy.probes import ProbeSet

log = structlog.get_logger()

KIND = "evaluate"
MAX_PENDING = 3  # jobs waiting before the loop stops at an experience end until one is done


@dataclass(frozen=True)
class EvaluationJob:
    """What one row needs: the experience that ended, the model then, the probe sets 1..experience."""

    experience: int
    model: FrozenModel
    probe_sets: dict[int, ProbeSet]
    record: dict  # the experience's record (domain, name, span, images, images/s …)


@dataclass(frozen=True)
class Evaluation:
    """A finished job: the row of R, the new probe set's floors, the record to go with them."""

    experience: int
    row: EvalRow
    baselines: dict
    record: dict
    seconds: float


class _Stopped(Exception):
    """The daemon stops while a job is scored: the job stays pending (in the checkpoint)."""


class Evaluator:
    """Scores experience ends on its own thread, within `budget` (docs/design.md, "deploy — evaluation at each experience end")."""

    def __init__(self, state_dir: Path, budget: ComputeBudget, metrics: Metrics | None = None) -> None:
        self.state_dir = state_dir
        self.budget = budget
        self.metrics = metrics
        self._jobs: deque[EvaluationJob] = deque()  # the head is the one being scored
        self._done: deque[Evaluation] = deque()
        self._cond = threading.Condition()
        self._urgent = 0  # flushes waiting: the budget does not bind
        self._stopping = False
        self._mark = 0.0  # perf_counter() since which the current job's seconds are not yet charged
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished."""
        with self._cond:
            return len(self._jobs)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: EvaluationJob) -> None:
        """Queue a row (the loop, at an experience end)."""
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()
        self._report()

    def wait_below(self, count: int) -> None:
        """Block until fewer than `count` jobs are pending (the budget does not bind meanwhile)."""
        with self._cond:
            self._urgent += 1
            self._cond.wait_for(lambda: len(self._jobs) < count or not self._thread.is_alive())
            self._urgent -= 1

    def finished(self) -> list[Evaluation]:
        """Rows done since the last call, in experience order."""
        with self._cond:
            done, self._done = list(self._done), deque()
        return done

    def flush(self, timeout: float | None = None) -> bool:
        """Score every pending job with the budget lifted; False if `timeout` ran out first."""
        with self._cond:
            self._urgent += 1
            try:
                return self._cond.wait_for(lambda: not self._jobs or not self._thread.is_alive(), timeout)
            finally:
                self._urgent -= 1

    def stop(self, timeout: float = 60.0) -> None:
        """Abandon the job under way (it stays pending) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                if self._stopping:
                    return
                job = self._jobs[0]
            try:
                done = self._score(job)
            except _Stopped:
                return
            with self._cond:
                self._jobs.popleft()
                self._done.append(done)
                self._cond.notify_all()
            self._report()

    def _score(self, job: EvaluationJob) -> Evaluation:
        """One row and the new probe set's floors, charged to the budget one probe set at a time."""
        started = self._mark = time.perf_counter()
        features_dir = self.state_dir / "metrics" / "probe_features"
        try:
            row = evaluate_row(job.model, job.probe_sets, job.experience, features_dir, pace=self._pace)
            self._pace()
            probes = job.probe_sets.get(job.experience)
            baselines = score_baselines(job.model, probes, self.state_dir) if probes is not None else {}
        except _Stopped:
            raise
        except Exception:  # a row of None rather than none: R keeps one row per experience
            log.exception("evaluation_failed", experience=job.experience)
            row, baselines = EvalRow(*([None] * job.experience for _ in range(4))), {}
        self._charge()
        return Evaluation(job.experience, row, baselines, job.record, time.perf_counter() - started)

    def _pace(self) -> None:
        """Between probe sets: charge the seconds since the last call, then wait for the budget
        unless a flush waits, another job waits behind this one, or the loop rests."""
        self._charge()
        while True:
            with self._cond:
                if self._stopping:
                    raise _Stopped
                if self._urgent or len(self._jobs) > 1:
                    break
            if self.budget.allows():
                break
            time.sleep(POLL_S)
        self._mark = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        self.budget.spent(KIND, now - self._mark)
        if self.metrics is not None:
            self.metrics.evaluation_seconds.inc(now - self._mark)
        self._mark = now

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.evaluations_pending.set(self.pending)


def requeue(evaluator: Evaluator, learner: Learner, checkpoint_root: Path, pending: list[dict],
            probe_sets: dict[int, ProbeSet]) -> list[int]:
    """After a restart: queue the rows a checkpoint left pending, each with the weights of its
    experience checkpoint (`exp-NNNNNN`). Returns the experiences that could not be queued
    (checkpoint or probe set gone), logged."""
    lost = []
    for entry in pending:
        experience = int(entry["experience"])
        weights = checkpoint_root / f"exp-{experience:06d}" / "model.safetensors"
        if not weights.is_file() or experience not in probe_sets:
            log.error("evaluation_lost", experience=experience, reason="its experience checkpoint or probe set is gone")
            lost.append(experience)
            continue
        model = FrozenModel.of(learner)
        model.method.load_state_dict(load_file(str(weights), device=str(learner.device)))
        sets = {j: p for j, p in probe_sets.items() if j <= experience}
        evaluator.submit(EvaluationJob(experience, model, sets, copy.deepcopy(entry["record"])))
        log.info("evaluation_requeued", experience=experience)
    return lost
