"""Sharded vs one exact VectorIndex: build time and search latency (a batch of queries and single
queries), measured interleaved so both see the same background load. Last line: one JSON object.

Run: `python benchmarks/index_shards.py --n 200000 --shards 4`.

With `--ondisk`: one IVF index with in-RAM vs on-disk (memory-mapped) inverted lists, same
training. A child process builds and publishes both; then each is loaded in a fresh child
(alternately, `--rounds` times) that reports resident memory (from /proc/self/status) after
load and after the searches, load time, and search latency. The list files are dropped from
the page cache after load, so the first batch reads them from disk (`first_batch_ms`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from replay.index import CURRENT_FILE, VectorIndex
from replay.index_options import IndexOptions

VARIANTS = {"ram": False, "disk": True}  # name → ondisk


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads (the daemon's indexer uses 1)")
    p.add_argument("--ondisk", action="store_true", help="in-RAM vs on-disk IVF lists")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="loads per variant (--ondisk)")
    p.add_argument("--phase", choices=["build", "measure"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


def _ms(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.array(seconds)
    return {"p50_ms": round(float(np.median(ms)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def exact_shards(a: argparse.Namespace) -> dict:
    """One exact index vs ``a.shards`` exact shards, kept live without publishing."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.n, a.dim)).astype(np.float32)
    q = rng.normal(size=(a.queries, a.dim)).astype(np.float32)
    ids, exps = [f"s{i}" for i in range(a.n)], [0] * a.n
    indexes, out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for shards in (1, a.shards):
            index = VectorIndex(
                Path(tmp) / str(shards),
                a.dim,
                IndexOptions(exact_max=10 * a.n, shard_max=0 if shards == 1 else -(-a.n // shards)),
            )
            builds = []
            for _ in range(3):
                t = time.perf_counter()
                built = index.build(1, x, ids, exps)
                builds.append(time.perf_counter() - t)
            index._version, index._table = 1, built.table  # live, without writing 400 MB to disk
            index.search(q[:10], a.k)
            indexes[index.kind] = index
            out[index.kind] = {
                "shards": len(built.table.shards),
                "build_s": round(float(np.median(builds)), 2),
                "batch": [],
                "single": [],
            }
        for _ in range(a.repeats):
            for kind, index in indexes.items():
                t = time.perf_counter()
                r = index.search(q, a.k)
                out[kind]["batch"].append(time.perf_counter() - t)
                out[kind]["result"] = r
        for row in q:
            for kind, index in indexes.items():
                t = time.perf_counter()
                index.search(row[None], a.k)
                out[kind]["single"].append(time.perf_counter() - t)
    r1, r2 = (v.pop("result") for v in out.values())
    for v in out.values():
        batch, single = _ms(v.pop("batch")), _ms(v.pop("single"))
        v.update(
            batch_p50_ms=round(batch["p50_ms"], 1),
            batch_p95_ms=round(batch["p95_ms"], 1),
            single_p50_ms=single["p50_ms"],
            single_p95_ms=single["p95_ms"],
        )
    same = r1.sample_ids == r2.sample_ids and bool(np.allclose(r1.scores, r2.scores, atol=1e-5))
    return {**out, "identical_results": same}


def _memory() -> dict[str, int]:
    """Resident memory of this process in MiB: total, anonymous (heap), file-backed, and peak."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[f"{fields[key]}_mib"] = int(value.split()[0]) // 1024
    return out


def build(a: argparse.Namespace) -> dict:
    """Build and publish the in-RAM and the on-disk IVF index from the same vectors."""
    x = np.random.default_rng(0).normal(size=(a.n, a.dim)).astype(np.float32)
    ids, exps = [f"s{i}" for i in range(a.n)], [0] * a.n
    out = {}
    for name, ondisk in VARIANTS.items():
        index = VectorIndex(a.root / name, a.dim, IndexOptions(exact_max=0, nprobe=a.nprobe, ondisk=ondisk))
        t = time.perf_counter()
        index.swap(index.build(1, x, ids, exps))
        out[name] = {"build_and_publish_s": round(time.perf_counter() - t, 1)}
    return out


def _evict(directory: Path) -> None:
    """Drop ``directory``'s files from the page cache, so the next reads come from disk."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(a: argparse.Namespace) -> dict:
    """Load one published index in this fresh process: memory, load time and search latency."""
    q = np.random.default_rng(1).normal(size=(a.queries, a.dim)).astype(np.float32)
    out = {"start": _memory()}
    index = VectorIndex(a.root, a.dim)
    t = time.perf_counter()
    index.load()
    out["load_s"] = round(time.perf_counter() - t, 2)
    out["after_load"] = _memory()
    _evict(a.root / "index" / (a.root / "index" / CURRENT_FILE).read_text())
    batches = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        result = index.search(q, a.k)
        batches.append(time.perf_counter() - t)
    singles = []
    for row in q:
        t = time.perf_counter()
        index.search(row[None], a.k)
        singles.append(time.perf_counter() - t)
    out["after_search"] = _memory()
    out["first_batch_ms"] = round(1000 * batches[0], 1)
    out["batch"], out["single"] = _ms(batches[1:]), _ms(singles)
    out["results_sha256"] = hashlib.sha256(json.dumps(result.sample_ids).encode()).hexdigest()[:16]
    return out


def _child(a: argparse.Namespace, phase: str, root: Path) -> dict:
    """Run ``phase`` in a fresh interpreter; its last stdout line is its JSON result."""
    argv = [sys.executable, __file__, "--phase", phase, "--root", str(root)]
    for flag in ("n", "dim", "queries", "k", "repeats", "threads", "nprobe"):
        argv += [f"--{flag}", str(getattr(a, flag))]
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ondisk(a: argparse.Namespace) -> dict:
    """In-RAM vs on-disk lists, each load in its own process, alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        out = _child(a, "build", Path(tmp))
        for name in VARIANTS:
            out[name]["rounds"] = []
        for _ in range(a.rounds):
            for name in VARIANTS:
                out[name]["rounds"].append(_child(a, "measure", Path(tmp) / name))
    hashes = {r.pop("results_sha256") for v in out.values() for r in v["rounds"]}
    return {**out, "identical_results": len(hashes) == 1}


def main() -> None:
    a = _args()
    faiss.omp_set_num_threads(a.threads)
    if a.phase:
        print(json.dumps(build(a) if a.phase == "build" else measure(a)))
        return
    common = {"n": a.n, "dim": a.dim, "queries": a.queries, "k": a.k, "repeats": a.repeats,
              "faiss_threads": a.threads}
    if a.ondisk:
        print(json.dumps({**common, "nprobe": a.nprobe, **ondisk(a)}))
    else:
        print(json.dumps({**common, **exact_shards(a)}))


if __name__ == "__main__":
    main()
