"""`tailord demo`: the whole story on one machine, bounded in time.

1. a fresh state dir, an embedded broker, and the daemon as a child process
   (`python -m deploy.cli run`, configured by TAILORD_* variables);
2. a stream of four real-image domains (digits -> fashion -> textures -> photos), one
   experience each, with live progress from `/admin/status`;
3. a snapshot for a fashion-like target task (fashion images the daemon never saw),
   over the admin API with the default strategy (`sept`: the newest checkpoint, SSL on the
   targets and similar stored samples; the routing vote is reported);
4. `report.png` and a summary: ACC, forgetting, BWT, the chosen checkpoint, URLs.

The daemon and the broker are stopped on success, on error and on Ctrl-C/SIGTERM.
`--quick` takes about 2 minutes on 2 CPU cores, the default about 5 to 10.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import FrameType
from typing import IO, Any

from deploy.probes import hashed_probe
from deploy.report import read_history, write_report
from streamer.broker import EmbeddedBroker, free_port
from streamer.produce import produce
from streamer.sources.builtin import builtin

MARKER = ".tailord-demo"  # only a folder holding this is ever deleted by the demo
TOPIC = "demo.images"
PROBE_FRACTION = 0.3  # full plan: >= 30 probes of every class of every domain, so the protocol's scores mean something
PROBE_MAX_IMAGES = 600  # keeps every probe of the full plan (<= ~500 per domain)
TARGET_DOMAIN = "fashion"
POLL_S = 1.0


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo run. The last domain is the largest, so its experience ends by count."""

    domains: tuple[tuple[str, int], ...]  # (builtin data set, images published)
    target_images: int  # fashion images the snapshot is tailored to (never streamed)
    sept_budget: int | None  # stored samples SEPT retrieves; None: the daemon's default
    timeout_s: float  # how long the stream may take to train


QUICK = Plan((("digits", 700), ("fashion", 700), ("textures", 400), ("photos", 800)), 40, 256, 480)
FULL = Plan((("digits", 1500), ("fashion", 1500), ("textures", 1200), ("photos", 1616)), 40, None, 1200)


def run_demo(quick: bool, state_dir: Path, keep: bool) -> int:
    """Run the demo; 0 on success. Raises UsageError for a state dir it must not touch."""
    from deploy.logs import configure_logging

    configure_logging("auto", "warning")  # the demo prints its own story
    plan = QUICK if quick else FULL
    state_dir = prepare_state_dir(Path(state_dir).resolve(), keep)
    started = time.monotonic()
    say(f"tailord demo ({'quick' if quick else 'full'}): state in {state_dir}")
    with stop_on_sigterm(), EmbeddedBroker() as broker:
        say(f"[1/5] embedded Kafka-protocol broker on {broker.bootstrap}")
        daemon = Daemon(state_dir, broker.bootstrap, experience_images(plan))
        try:
            daemon.start()
            say(f"[2/5] daemon up (pid {daemon.proc.pid}), metrics {daemon.url}/metrics, log {daemon.log_path}")
            say(f"      status page: {daemon.url}/  (open it in a browser; it refreshes every 5 s)")
            first = daemon.status()["experience"]
            say(f"[3/5] streaming {len(plan.domains)} domains, one experience each:")
            for name, count in plan.domains:
                sent = produce(f"builtin:{name}", TOPIC, broker.bootstrap, limit=count, batch=8, progress=False)
                check_interrupted()
                say(f"      published {sent:,} {name} images")
            follow_training(daemon, plan, first)
            check_interrupted()
            say("[4/5] snapshot for a fashion-like target task (sept over the admin API)")
            snapshot = make_snapshot(daemon, plan, state_dir)
            report = write_report(state_dir, state_dir / "report.png")
            say("[5/5] report written")
            print_summary(state_dir, daemon, plan, snapshot, report, time.monotonic() - started)
        finally:
            daemon.stop()
    say("daemon and broker stopped")
    return 0


def say(line: str) -> None:
    print(line, flush=True)


def prepare_state_dir(state_dir: Path, keep: bool) -> Path:
    """An empty state dir (or the previous demo's with `keep`); never wipes a folder it did not make."""
    from deploy.errors import UsageError

    if state_dir.exists() and not keep and any(state_dir.iterdir()):
        if not (state_dir / MARKER).is_file():
            raise UsageError(f"--state-dir {state_dir}: exists and is not a demo state dir; "
                             "pick another folder or remove it")
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / MARKER).write_text("created by `tailord demo`; deleted by the next demo run unless --keep\n")
    return state_dir


INTERRUPTED = threading.Event()  # set by SIGINT/SIGTERM while the demo runs


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into KeyboardInterrupt so the `finally` blocks stop the children,
    and remember it: `check_interrupted` raises it again where a library swallowed the first one
    (kafka-python's IO tasks catch BaseException while the producer publishes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    INTERRUPTED.clear()
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_interrupted() -> None:
    """KeyboardInterrupt if a signal asked the demo to stop (see `stop_on_sigterm`)."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


def trained_count(name: str, count: int) -> int:
    """Images of the first `count` of builtin `name` the daemon trains on (the rest are probes)."""
    return sum(not hashed_probe(f"{name}/{item.key}", PROBE_FRACTION) for item in islice(builtin(name), count))


def experience_images(plan: Plan) -> int:
    """TAILORD_EXPERIENCE_IMAGES: exactly the last domain's trained images, so its experience ends.

    Earlier domains train fewer images each, so their experiences end at the domain change.
    """
    counts = [trained_count(name, count) for name, count in plan.domains]
    assert max(counts[:-1]) < counts[-1], f"the last domain must be the largest: {counts}"
    return counts[-1]


class Daemon:
    """`python -m deploy.cli run` in its own process group, logging JSON to `<state>/daemon.log`."""

    def __init__(self, state_dir: Path, bootstrap: str, experience_images: int) -> None:
        self.port = free_port()
        self.token = secrets.token_urlsafe(18)
        self.token_path = state_dir / "admin.token"  # 0600: the token is never printed
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(self.token + "\n")
        self.log_path = state_dir / "daemon.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TAILORD_")}
        self.env.update({
            "TAILORD_BOOTSTRAP_SERVERS": bootstrap, "TAILORD_TOPIC": TOPIC, "TAILORD_STATE_DIR": str(state_dir),
            "TAILORD_HTTP_HOST": "127.0.0.1", "TAILORD_HTTP_PORT": str(self.port),
            "TAILORD_ADMIN_TOKEN": self.token, "TAILORD_PRESET": "cpu", "TAILORD_SPLIT_ON_DOMAIN": "true",
            "TAILORD_EXPERIENCE_IMAGES": str(experience_images), "TAILORD_PROBE_FRACTION": str(PROBE_FRACTION),
            "TAILORD_PROBE_MAX_IMAGES": str(PROBE_MAX_IMAGES),
            "TAILORD_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run"], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     process_group=0)  # Ctrl-C reaches the demo, which stops the daemon
        deadline = time.monotonic() + timeout
        while not self._answers():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not answer on {self.url} within {timeout:.0f} s; "
                                   f"see {self.log_path}")
            time.sleep(0.5)

    def _answers(self) -> bool:
        from deploy.snapshot_client import AdminError, admin_get

        try:
            admin_get(self.url, "/admin/status", self.token)
        except AdminError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        from deploy.snapshot_client import admin_get

        return admin_get(self.url, "/admin/status", self.token)

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {self.proc.returncode}; see {self.log_path}")

    def stop(self, timeout: float = 120) -> None:
        """SIGTERM (the daemon finishes its step and checkpoints), SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def follow_training(daemon: Daemon, plan: Plan, first_experience: int) -> None:
    """Show progress until every domain's experience has ended and been scored (bounded by `plan.timeout_s`;
    the daemon scores rows of R off its training loop, docs/design.md "deploy — evaluation at each experience end")."""
    goal = first_experience + len(plan.domains)
    names = [name for name, _ in plan.domains]
    deadline = time.monotonic() + plan.timeout_s
    tty = sys.stdout.isatty()
    last_line, last_print = "", 0.0
    while True:
        check_interrupted()
        daemon.check_alive()
        status = daemon.status()
        if status["experience"] >= goal and (status.get("last_evaluated_experience") or 0) >= goal - 1:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"training the stream took over {plan.timeout_s:.0f} s "
                               f"(experience {status['experience']} of {goal - 1}); see {daemon.log_path}")
        rate = status.get("images_per_second", 0.0)  # the daemon's own sliding-window rate
        index = status["experience"] - first_experience
        domain = names[index] if 0 <= index < len(names) else status.get("domain")
        line = (f"      experience {status['experience']} ({domain}): {status['images_total']:,} images trained, "
                f"{rate:.0f} images/s, lag {sum(status.get('lag', {}).values()):,} records")
        if status["experience"] >= goal:
            line = f"      scoring the last experiences: {status.get('evaluations_pending', 0)} rows of R to go"
        if tty:
            print(f"\r{line:<110}", end="", flush=True)
        elif line.split(":")[0] != last_line.split(":")[0] or time.monotonic() - last_print > 15:
            say(line)
            last_print = time.monotonic()
        last_line = line
        time.sleep(POLL_S)
    if tty:
        print()
    say(f"      all {len(plan.domains)} experiences finished: {status['images_total']:,} images trained")


def make_snapshot(daemon: Daemon, plan: Plan, state_dir: Path) -> dict[str, Any]:
    """Tailor a checkpoint to fashion images published after the streamed ones (unseen by the daemon)."""
    from deploy.snapshot_client import request_snapshot

    streamed = dict(plan.domains)[TARGET_DOMAIN]
    with tempfile.TemporaryDirectory(prefix="tailord-target-") as target:
        for item in islice(builtin(TARGET_DOMAIN), streamed, streamed + plan.target_images):
            (Path(target) / f"{item.key}.{item.fmt_ext}").write_bytes(item.encoded)
        return request_snapshot(target=target, labels=None, out=state_dir / "demo-snapshot", strategy=None,
                                budget=plan.sept_budget, state_dir=None, url=daemon.url, token=daemon.token,
                                config=None)


def print_summary(state_dir: Path, daemon: Daemon, plan: Plan, snapshot: dict[str, Any], report: str,
                  elapsed: float) -> None:
    """The accuracy matrix beside its floors, ACC, forgetting, BWT, the snapshot, and where everything is."""
    history = read_history(state_dir)
    last = history["records"][-1]
    domains = {r["experience"]: r.get("domain") for r in history["records"]}
    say("")
    say(f"==== tailord demo: done in {elapsed / 60:.1f} min ====")
    for line in matrix_lines(history, domains):
        say(line)
    say(f"ACC {fmt(last.get('acc'))}   average forgetting {fmt(last.get('avg_forgetting'))}   "
        f"BWT {fmt(last.get('bwt'), '+')}   linear-probe ACC {fmt(last.get('acc_linear'))}")
    say(verdict(history, domains))
    say(snapshot_line(snapshot, domains, plan.target_images))
    say(f"              {snapshot['path']}")
    say(f"checkpoints:  {state_dir / 'checkpoints'}")
    say(f"report:       {report}")
    say(f"status page:  {daemon.url}/   (live until the demo exits)")
    say(f"metrics:      {daemon.url}/metrics   admin API: {daemon.url}/admin/status "
        f"(Bearer token in {daemon.token_path}); served until the demo exits")
    say(f"serve it again: TAILORD_STATE_DIR={state_dir} tailord run")


def snapshot_line(snapshot: dict[str, Any], domains: dict[int, str | None], targets: int) -> str:
    """Where the demo's snapshot started, which experience the routing vote found, what SEPT trained on."""
    chosen, candidates = snapshot["chosen_experience"], snapshot.get("candidates", [])
    voted = (f"; the routing vote put {candidates[0]['vote_share']:.0%} on experience {candidates[0]['experience']} "
             f"({domains.get(candidates[0]['experience'], '?')})") if candidates else ""
    return (f"snapshot:     {snapshot['strategy']} from experience {chosen}'s checkpoint ({domains.get(chosen, '?')})"
            f"{voted} for {targets} unseen {TARGET_DOMAIN} images; SEPT trained on them and "
            f"{snapshot['retrieved_count']} retrieved samples")


def fmt(value: float | None, sign: str = "") -> str:
    return "n/a" if value is None else f"{value:{sign}.3f}"


def matrix_lines(history: dict[str, Any], domains: dict[int, str | None]) -> list[str]:
    """R (kNN), then each probe set's floors: raw pixels and the untrained encoder."""
    experiences = history["experiences"]
    baselines = history.get("baselines", {})
    lines = [f"accuracy matrix R (leave-one-out kNN on probe set j after experience i, {PROBE_FRACTION:.0%} "
             "probes; protocol: docs/continual.md):",
             "    after \\ probe      " + "".join(f"{domains.get(e) or '?':>10}" for e in experiences)]
    for experience, row in zip(experiences, history["accuracy"], strict=True):
        lines.append(f"    {domains.get(experience) or '?':>17} " + "".join(f"{fmt(v):>10}" for v in row))
    for key, name in (("pixels", "floor: raw pixels"), ("untrained", "floor: untrained")):
        values = [((baselines.get(str(e)) or {}).get(key) or {}).get("knn") for e in experiences]
        lines.append(f"    {name:>17} " + "".join(f"{fmt(v):>10}" for v in values))
    return lines


def verdict(history: dict[str, Any], domains: dict[int, str | None]) -> str:
    """Did training help? The final encoder vs the untrained one, probe set by probe set."""
    final = history["accuracy"][-1]
    baselines = history.get("baselines", {})
    gains = []
    for experience, value in zip(history["experiences"], final, strict=False):
        untrained = ((baselines.get(str(experience)) or {}).get("untrained") or {}).get("knn")
        if value is not None and untrained is not None:
            gains.append((domains.get(experience) or "?", value - untrained))
    if not gains:
        return "final encoder vs untrained: n/a (no labelled probe set)"
    wins = sum(gain >= 0 for _, gain in gains)
    detail = ", ".join(f"{name} {gain:+.3f}" for name, gain in gains)
    return f"final encoder vs untrained (kNN): {detail}; at or above it on {wins} of {len(gains)} domains"
