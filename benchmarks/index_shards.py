"""Sharded vs one exact VectorIndex: build time and search latency (a batch of queries and single
queries), measured interleaved so both see the same background load. Last line: one JSON object.

Run: `python benchmarks/index_shards.py --n 200000 --shards 4`.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from replay.index import VectorIndex

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=200_000)
p.add_argument("--dim", type=int, default=512)
p.add_argument("--queries", type=int, default=500)
p.add_argument("--k", type=int, default=50)
p.add_argument("--repeats", type=int, default=7)
p.add_argument("--shards", type=int, default=4)
p.add_argument("--threads", type=int, default=1, help="FAISS threads (the daemon's indexer uses 1)")
a = p.parse_args()
faiss.omp_set_num_threads(a.threads)
rng = np.random.default_rng(0)
x = rng.normal(size=(a.n, a.dim)).astype(np.float32)
q = rng.normal(size=(a.queries, a.dim)).astype(np.float32)
ids, exps = [f"s{i}" for i in range(a.n)], [0] * a.n
with tempfile.TemporaryDirectory() as tmp:
    indexes, out = {}, {}
    for shards in (1, a.shards):
        index = VectorIndex(
            Path(tmp) / str(shards),
            a.dim,
            exact_max=10 * a.n,
            shard_max=0 if shards == 1 else -(-a.n // shards),
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
(one, r1), (sh, r2) = [(k, v.pop("result")) for k, v in out.items()]
for v in out.values():
    b, s = 1000 * np.array(v.pop("batch")), 1000 * np.array(v.pop("single"))
    v.update(
        batch_p50_ms=round(float(np.median(b)), 1),
        batch_p95_ms=round(float(np.percentile(b, 95)), 1),
        single_p50_ms=round(float(np.median(s)), 2),
        single_p95_ms=round(float(np.percentile(s, 95)), 2),
    )
same = r1.sample_ids == r2.sample_ids and bool(np.allclose(r1.scores, r2.scores, atol=1e-5))
print(
    json.dumps(
        {
            "n": a.n,
            "dim": a.dim,
            "queries": a.queries,
            "k": a.k,
            "repeats": a.repeats,
            "faiss_threads": a.threads,
            **out,
            "identical_results": same,
        }
    )
)
