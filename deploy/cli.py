"""`tailord` command line. Exit codes: 0 ok, 2 usage or config error, 1 runtime failure.

Errors are one line on stderr; set TAILORD_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from deploy.errors import UsageError
from deploy.settings import SettingsError, load_settings


def cmd_broker(args: argparse.Namespace) -> int:
    from streamer.broker import run_foreground

    return run_foreground(port=args.port, data_dir=args.data_dir)


def cmd_produce(args: argparse.Namespace) -> int:
    from streamer.produce import produce

    try:
        sent = produce(args.source, topic=args.topic, bootstrap=args.bootstrap, domain=args.domain,
                       limit=args.limit, batch=args.batch, probe_every=args.probe_every, no_domain=args.no_domain)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    print(json.dumps({"sent": sent, "topic": args.topic, "source": args.source}))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        return run_torchrun(args.nproc, args.config)
    from deploy.daemon import run
    from deploy.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    return run(settings)


def run_torchrun(nproc: int, config: Path | None) -> int:
    """Run `nproc` DDP ranks of `tailord run` on this host under torchrun; its exit code.

    torchrun runs in its own session and SIGTERM/SIGINT are relayed to the ranks
    themselves: each checkpoints and exits 0, so torchrun exits 0 too (signalled directly,
    torchrun would kill the ranks and exit 1). If this process dies, the kernel sends
    torchrun SIGTERM (PR_SET_PDEATHSIG), which stops the ranks the same way.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "deploy.cli", "run"]
    if config is not None:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_term_with_parent)

    def relay(signum: int, _frame: object) -> None:
        for pid in child_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, relay)
    return proc.wait()


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    pids: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in children.read_text().split()]
    return pids


def _term_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux prctl)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


TOKEN_ARG_WARNING = ("tailord: warning: --token is deprecated (other users can read it in the process list); "
                     "use TAILORD_ADMIN_TOKEN, --token-file, or the daemon's <state dir>/admin.token")


def warn_token_argument(args: argparse.Namespace) -> None:
    """--token still works, with a warning on stderr."""
    if args.token is not None:
        print(TOKEN_ARG_WARNING, file=sys.stderr)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from deploy.snapshot_client import request_snapshot, summary_line

    warn_token_argument(args)
    result = request_snapshot(target=args.target, labels=args.labels, out=args.out, strategy=args.strategy,
                              budget=args.budget, state_dir=args.state_dir, url=args.url, token=args.token,
                              config=args.config, token_file=args.token_file, epochs=args.epochs)
    print(json.dumps(result, indent=2))
    print(summary_line(result), file=sys.stderr)  # stdout stays one JSON document for scripts
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deploy.snapshot_client import admin_get, resolve_endpoint

    warn_token_argument(args)
    url, token = resolve_endpoint(args.url, args.token, args.config, args.token_file)
    print(json.dumps(admin_get(url, "/admin/status", token), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deploy.report import write_report

    state_dir = args.state_dir or load_settings(args.config).state_dir
    print(write_report(Path(state_dir), Path(args.out)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deploy.demo import run_demo

    return run_demo(quick=args.quick, state_dir=Path(args.state_dir), keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per row of docs/design.md's "Command line" table."""
    parser = argparse.ArgumentParser(prog="tailord", description="Streaming continual-pretraining daemon.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker in the foreground")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("produce", help="publish images to a topic")
    p.add_argument("source", help="a directory, a .tar, or builtin:NAME (digits, fashion, textures, photos)")
    p.add_argument("--topic", required=True)
    p.add_argument("--bootstrap", default=os.environ.get("TAILORD_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    p.add_argument("--domain", default=None, help="domain header (default: the source's name)")
    p.add_argument("--no-domain", action="store_true",
                   help="send no domain header (a header-less stream: TAILORD_BOUNDARY=drift finds its experiences)")
    p.add_argument("--limit", type=int, default=None, help="send at most N images")
    p.add_argument("--batch", type=int, default=1, help="images per record (K>1 sends tar batches)")
    p.add_argument("--probe-every", type=int, default=0, help="mark every N-th image probe=1 (0: none)")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("run", help="run the daemon (configured by TAILORD_* / .env / --config)")
    p.add_argument("--config", type=Path, default=None, help="a TOML file of settings")
    p.add_argument("--nproc", type=int, default=1,
                   help="DDP ranks on this host (wraps torchrun; each rank reads its own partitions)")
    p.set_defaults(func=cmd_run)

    add_snapshot_parser(sub)

    p = sub.add_parser("status", help="daemon status as JSON")
    add_endpoint_arguments(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="plot accuracy matrix, forgetting and throughput")
    p.add_argument("--out", default="report.png")
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--config", type=Path, default=None)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole story on one machine")
    p.add_argument("--quick", action="store_true", help="about 2 minutes instead of about 8")
    p.add_argument("--state-dir", default="demo-state")
    p.add_argument("--keep", action="store_true", help="keep the previous demo state instead of starting fresh")
    p.set_defaults(func=cmd_demo)
    return parser


def add_snapshot_parser(sub: argparse._SubParsersAction) -> None:
    """`tailord snapshot`: its options name the defaults the daemon applies when they are left out."""
    p = sub.add_parser("snapshot", help="export a checkpoint tailored to a target task")
    p.add_argument("--target", required=True, help="folder of target images (under TAILORD_TARGETS_DIR, or uploaded)")
    p.add_argument("--labels", default=None, help="CSV of filename,label for the target images")
    p.add_argument("--out", required=True, help="folder to copy the snapshot into")
    p.add_argument("--strategy", choices=["route", "sept", "route+sept"], default=None,
                   help="route: the checkpoint of the experience your images resemble; sept (default): SSL "
                   "continued on your images and similar stored samples from the newest checkpoint; "
                   "route+sept: the same from the routed checkpoint")
    p.add_argument("--budget", type=int, default=None,
                   help="samples retrieved for sept (default: 5%% of the store, at most a third of the target images, "
                   "within 64-2000)")
    p.add_argument("--epochs", type=int, default=None,
                   help="sept's passes over the targets and the retrieved samples (default 10; at most 200 steps)")
    p.add_argument("--state-dir", type=Path, default=None, help="work offline on a stopped daemon's state")
    add_endpoint_arguments(p)
    p.set_defaults(func=cmd_snapshot)


def add_endpoint_arguments(p: argparse.ArgumentParser) -> None:
    """--url, --token-file, the deprecated --token and --config of the admin API clients."""
    p.add_argument("--url", default=None, help="daemon URL (default from TAILORD_HTTP_HOST/PORT)")
    p.add_argument("--token-file", default=None,
                   help="file holding the admin token (default: TAILORD_ADMIN_TOKEN, else <state dir>/admin.token, "
                        "both only sent to the configured daemon)")
    p.add_argument("--token", default=None, help="deprecated (visible in the process list): use --token-file")
    p.add_argument("--config", type=Path, default=None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tailord` console script."""
    args = build_parser().parse_args(argv)
    from deploy.logs import configure_logging

    configure_logging(os.environ.get("TAILORD_LOG_FORMAT", "auto"), os.environ.get("TAILORD_LOG_LEVEL", "info"))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (SettingsError, UsageError) as exc:
        print(f"tailord: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("TAILORD_DEBUG"):
            traceback.print_exc()
        print(f"tailord: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
