"""Index upkeep at store scale: the indexer's compute share, training speed with it on vs off,
and how far the budgeted index's retrieval and routing fall from a full re-embed (issue #17).

1. Store: `--store` real samples (the built-in domains digits, fashion, textures, photos, a
   quarter each as experiences 1-4; their items repeated with random crops and flips, 32 px
   PNGs), indexed before anything is timed with checkpoint `exp-000004`: the `cpu` preset's
   learner after `--warm-images` of that data (a store this size exists only after a long run,
   so its encoder has trained; `--warm-images 0`: the untrained encoder, the worst case for
   the first refresh). Both arms below start from that checkpoint.
2. Off: `--experiences` experiences of `--experience-images` stream images (domains in turn,
   same augmentation) trained with the `cpu` preset's learner, no indexer work: images/s.
3. On: the same experiences from the same initial weights, each batch submitted to the indexer
   as the daemon does (`ComputeBudget(--share)`, the step and the indexer's chunks in turns on
   the cores: `deploy/compute_turns.py`), a checkpoint and `new_encoder` after each. Each
   experience's `training` record splits its seconds: the steps' own, the wall (the steps, the
   turns waited and the submits), what the indexer was charged and the CPU its thread used
   (what it uses beyond the charge is work outside its turns, e.g. storing). The off arm
   reports its steps too.
   After each experience (no step runs then, so the indexer's allowance does not grow):
   - truth: every stored sample re-embedded with the newest checkpoint, searched exactly;
   - recall@50 per target image of the live index (queries embedded with its encoder) and of
     the live index's top `--rerank`x50 re-ranked by the newest encoder (what a snapshot can do);
   - SEPT's retrieval (`replay.retrieval`) of each domain's targets, at the smallest budget and
     at the engine's default for those targets and the store: the share of the fresh
     retrieval's samples that the live index retrieves, as is (`pool_x1`) and picked from a
     pool `--rerank` times the budget re-ranked by the newest encoder (`SnapshotEngine`'s
     re-rank when the index lags);
   - routing agreement: each domain's targets (`--targets` held-out items, never stored)
     routed on the live index vs on the truth.
4. Paired on/off (`paired`): the arms above run minutes apart, and this VM's speed drifts by
   15-30 % over minutes, so their ratio says little. After the experiences, on the on arm's
   learner and indexer (a refresh usually under way), `--paired-rounds` rounds each train one
   block of `--paired-steps` steps with the indexer (batches submitted, chunks in turns within
   the share) and one without (nothing submitted; the block holds the cores' turn, so no chunk
   runs), in random order: images/s over each block's wall, their ratio, and each round's.
5. The re-rank's cost: seconds to read, decode and embed pools of those sizes with the newest
   checkpoint, with no training (`rerank_seconds`, keyed budget x pool factor).
The last line printed is one JSON object. Run: `python -m benchmarks.index_upkeep`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the daemon sets it (deploy/__init__.py): the off arm too
import faiss  # noqa: E402 - after the OpenMP policy
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

DOMAINS = ("digits", "fashion", "textures", "photos")
K = 50
BATCH = 64


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def domain_pixels(seed: int, targets: int) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Per domain: RGB arrays of the items to store/stream, and `targets` held-out ones."""
    from streamer.sources import open_source

    rng = np.random.default_rng(seed)
    pool, held = {}, {}
    for name in DOMAINS:
        images = [np.asarray(Image.open(io.BytesIO(item.encoded)).convert("RGB"))
                  for item in open_source(f"builtin:{name}").items]
        order = rng.permutation(len(images))
        held[name] = [images[i] for i in order[:targets]]
        pool[name] = [images[i] for i in order[targets:]]
    return pool, held


def augmented_png(pixels: np.ndarray, rng: np.random.Generator, side: int = 32) -> bytes:
    """A random crop (60-100 % of the side) of `pixels`, maybe flipped, resized to `side`, as PNG."""
    h, w = pixels.shape[:2]
    crop = max(4, int(min(h, w) * rng.uniform(0.6, 1.0)))
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    patch = pixels[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(patch)).resize((side, side), Image.BILINEAR).save(out, format="PNG")
    return out.getvalue()


def stream(pool: list[np.ndarray], count: int, rng: np.random.Generator, tag: str) -> tuple[list[str], list[bytes]]:
    """`count` augmented samples of a domain pool: (sample ids, PNG bytes)."""
    picks = rng.integers(0, len(pool), count)
    return [f"{tag}-{i}" for i in range(count)], [augmented_png(pool[p], rng) for p in picks]


def build_learner(state_dir: Path, start: Path | None = None):
    """The `cpu` preset's learner with the daemon's default method, from checkpoint `start` if given."""
    from deploy.learner import build_learner as build
    from deploy.learner import load_learner_state
    from deploy.settings import Settings

    torch.manual_seed(0)
    learner = build(Settings(state_dir=state_dir, preset="cpu"))
    if start is not None:
        load_learner_state(learner, start)
    return learner


def save_checkpoint(learner, state_dir: Path, experience: int) -> Path:
    from deploy.checkpoints import write_checkpoint
    from deploy.learner import learner_writers

    manifest = {"kind": "experience", "experience": experience, **learner.describe()}
    return write_checkpoint(state_dir / "checkpoints", f"exp-{experience:06d}", learner_writers(learner),
                            manifest).path


def decoded(encoded: list[bytes], size: int) -> torch.Tensor:
    from deploy.indexer import decode_images
    from streamer.limits import DecodeLimits

    return decode_images(encoded, size, DecodeLimits())[0]


def prefill(indexer, pool: dict[str, list[np.ndarray]], total: int, rng: np.random.Generator) -> None:
    """Experiences 1-4: a quarter of `total` samples of each domain, stored (not yet indexed)."""
    for experience, name in enumerate(DOMAINS, start=1):
        for start in range(0, total // len(DOMAINS), 1000):
            ids, pngs = stream(pool[name], min(1000, total // len(DOMAINS) - start), rng, f"{name}-{start}")
            indexer.submit(ids, pngs, experience, [name] * len(ids))
        say(f"prefilled {name} (experience {experience})")


def train_experience(learner, encoded: list[bytes], on_batch, turns=None) -> tuple[float, float]:
    """Train one experience on `encoded` (decoded up front), each step in `turns` with the
    indexer as in the daemon (none: no waiting); returns (step seconds, wall seconds)."""
    from deploy.compute_turns import ComputeTurns

    turns = turns or ComputeTurns(enabled=False)
    images = decoded(encoded, learner.preset.resolution)
    step_seconds, started = 0.0, time.perf_counter()
    for first in range(0, len(images) - BATCH + 1, BATCH):
        with turns:
            result = learner.step(images[first:first + BATCH], None)
        step_seconds += result.seconds
        on_batch(first, result.seconds)
    return step_seconds, time.perf_counter() - started


class StoreImages:
    """Every stored non-probe sample decoded once (new ones added on each `update`), so a full
    re-embed for the truth costs forward passes only."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.experiences: list[int] = []
        self.parts: list[torch.Tensor] = []

    def update(self, indexer) -> None:
        known = set(self.ids)
        for rows, payloads in indexer.store.iter_records(probe=False, batch_size=1024):
            fresh = [i for i, row in enumerate(rows) if row.sample_id not in known]
            if fresh:
                self.parts.append(decoded([payloads[i] for i in fresh], indexer.decode_size))
                self.ids += [rows[i].sample_id for i in fresh]
                self.experiences += [rows[i].experience for i in fresh]

    def embed(self, encoder) -> np.ndarray:
        """(N,D) vectors of every cached sample under `encoder`."""
        images = torch.cat(self.parts)
        return np.concatenate([encoder(images[i:i + 1024]) for i in range(0, len(images), 1024)])


def evaluate(indexer, cache: StoreImages, newest, held: dict[str, torch.Tensor], rerank: list[int]) -> dict:
    """Recall@50 (live, live re-ranked) and routing agreement against a full re-embed by `newest`,
    and the recall of SEPT's retrieval (`sept_retrieval`)."""
    from deploy.indexer import Encoder, experience_checkpoints
    from replay.routing import route, route_targets

    cache.update(indexer)
    truth, ids, experiences = cache.embed(newest), cache.ids, np.asarray(cache.experiences)
    row_of = {sid: i for i, sid in enumerate(ids)}
    exact = faiss.IndexFlatIP(truth.shape[1])
    exact.add(truth)
    version = indexer.encoder_version
    live = Encoder.load(version, experience_checkpoints(indexer.checkpoint_root)[version], "cpu")
    recalls, reranked, agree, candidates = [], {f: [] for f in rerank}, [], 0
    fresh = Fresh(ids, truth, row_of)
    sept = {budget: {key: [] for key in (*(f"pool_x{f}" for f in (1, *rerank)), "unindexed")}
            for budget in sept_budgets(len(next(iter(held.values()))), len(ids))}
    for images in held.values():
        q_new, q_live = newest(images), live(images)
        scores, rows = exact.search(q_new, K)
        truth_sets = [{ids[j] for j in row} for row in rows]
        found = indexer.index.search(q_live, K).sample_ids
        recalls += [len(truth_sets[i] & set(found[i])) / K for i in range(len(found))]
        for factor in rerank:
            pools = indexer.index.search(q_live, K * factor).sample_ids
            candidates += len({sid for pool in pools for sid in pool if sid}) if factor == rerank[0] else 0
            reranked[factor] += [len(truth_sets[i] & set(fresh.rerank(pool, q_new[i:i + 1], K))) / K
                                 for i, pool in enumerate(pools)]
        for budget, by_key in sept.items():
            for key, value in fresh.sept_recall(indexer.index, q_live, q_new, budget, rerank).items():
                by_key[key].append(value)
        agree.append(route_targets(indexer.index, q_live)[0][0] == route(scores, experiences[rows])[0][0])
    return {"live_encoder": version, "recall_at_50": round(float(np.mean(recalls)), 4),
            **{f"recall_at_50_reranked_x{f}": round(float(np.mean(v)), 4) for f, v in reranked.items()},
            "sept_retrieval": {f"budget_{b}": {key: round(float(np.mean(v)), 4) for key, v in by.items()}
                               for b, by in sept.items()},
            "rerank_embeddings": candidates, "routing_agreement": round(float(np.mean(agree)), 3),
            "stored": len(ids)}


def sept_budgets(targets: int, stored: int) -> list[int]:
    """The smallest SEPT budget and the engine's default for `targets` images on a store of `stored`."""
    from deploy.snapshots import BUDGET_MIN, default_budget

    return sorted({BUDGET_MIN, default_budget(targets, stored)})


class Fresh:
    """The full re-embed (`truth`, one row per stored id): the truth of SEPT's retrieval and the
    vectors a snapshot's re-rank would compute for the pool the live index returned."""

    def __init__(self, ids: list[str], truth: np.ndarray, row_of: dict[str, int]) -> None:
        self.ids, self.truth, self.row_of = ids, truth, row_of

    def rerank(self, pool: list[str], queries: np.ndarray, budget: int) -> list[str]:
        from replay.retrieval import rerank_budget

        known = [sid for sid in pool if sid in self.row_of]
        return rerank_budget(known, self.truth[[self.row_of[s] for s in known]], queries, budget)

    def sept_recall(self, index, q_live: np.ndarray, q_new: np.ndarray, budget: int,
                    factors: list[int]) -> dict[str, float]:
        """Shares of the fresh retrieval's `budget` samples that the live index's retrieval finds
        too: `pool_x1` as is, `pool_xF` from a pool of F budgets re-ranked by the fresh vectors;
        and `unindexed`, the share the live index does not hold at all (no pool finds those)."""
        from replay.retrieval import retrieve_budget

        truth = set(self.rerank(self.ids, q_new, budget))
        shares = {"unindexed": len(index.missing(sorted(truth))) / max(len(truth), 1)}
        for factor in (1, *factors):
            pool = retrieve_budget(index, q_live, budget * factor)
            found = pool if factor == 1 else self.rerank(pool, q_new, budget)
            shares[f"pool_x{factor}"] = len(truth & set(found)) / max(len(truth), 1)
        return shares


def rerank_cost(indexer, newest, budgets: list[int], factors: list[int]) -> dict[str, float]:
    """Seconds a snapshot's re-rank takes for pools of budget x factor stored samples (read from
    the store, decoded, embedded by `newest`: `deploy.snapshot_rerank.embed_stored`), one run each."""
    from deploy.snapshot_rerank import embed_stored
    from streamer.limits import DecodeLimits

    ids = indexer.store.sample_ids(probe=False)

    def read(sample_ids: list[str]) -> tuple[list, list[bytes]]:
        rows = indexer.store.catalog.get(sample_ids)
        return [rows[sid] for sid in sample_ids], indexer.store.read(sample_ids)

    seconds = {}
    for budget in budgets:
        for factor in factors:
            started = time.perf_counter()
            embed_stored(newest, read, ids[:budget * factor], indexer.decode_size, DecodeLimits())
            seconds[f"{budget}x{factor}"] = round(time.perf_counter() - started, 2)
    return seconds


def thread_cpu_seconds(name: str) -> float | None:
    """CPU seconds the thread called `name` has used so far (Linux's /proc; None elsewhere)."""
    thread = next(t for t in threading.enumerate() if t.name == name)
    try:
        fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_off(state_dir: Path, start: Path, experiences: list) -> tuple[float, list[float]]:
    """Images/s of training the experiences from checkpoint `start` with no indexer, and each
    experience's step seconds."""
    learner = build_learner(state_dir, start)
    timed = [train_experience(learner, pngs, lambda *_: None) for _, _, _, pngs in experiences]
    images = sum(len(pngs) // BATCH * BATCH for *_, pngs in experiences)
    return images / sum(wall for _, wall in timed), [round(step, 2) for step, _ in timed]


def run_on(indexer, start: Path, experiences: list, held: dict[str, torch.Tensor],
           rerank: list[int]) -> tuple[float, list[dict], object]:
    """Images/s of training the experiences from `start` with the indexer on, the evaluation after
    each, and the learner."""
    from deploy.indexer import Encoder

    learner = build_learner(indexer.state_dir, start)
    wall, records, cache = 0.0, [], StoreImages()
    for experience, domain, ids, pngs in experiences:
        def on_batch(first: int, seconds: float, ids=ids, pngs=pngs, experience=experience, domain=domain) -> None:
            indexer.budget.trained(seconds)
            n = min(BATCH, len(ids) - first)
            indexer.submit(ids[first:first + n], pngs[first:first + n], experience, [domain] * n)
        charged, cpu = sum(indexer.budget.seconds.values()), thread_cpu_seconds("indexer")
        step_s, wall_s = train_experience(learner, pngs, on_batch, indexer.budget.turns)
        wall += wall_s
        timing = {"step_seconds": round(step_s, 2), "wall_seconds": round(wall_s, 2),
                  "indexer_charged_seconds": round(sum(indexer.budget.seconds.values()) - charged, 2),
                  "indexer_cpu_seconds": None if cpu is None else round(thread_cpu_seconds("indexer") - cpu, 2)}
        path = save_checkpoint(learner, indexer.state_dir, experience)
        assert indexer.wait_stored(60)  # the experience's last batches, behind a chunk waiting for its turn
        indexer.new_encoder(experience, path)
        upkeep = indexer.upkeep()
        record = {"experience": experience, "domain": domain, "versions_behind": upkeep.versions_behind,
                  "unindexed": upkeep.unindexed, "refresh_progress": round(upkeep.refresh_progress, 3),
                  "share": round(upkeep.share, 4), "training": timing,
                  **evaluate(indexer, cache, Encoder.load(experience, path, "cpu"), held, rerank)}
        say(json.dumps(record))
        records.append(record)
    return sum(len(pngs) // BATCH * BATCH for *_, pngs in experiences) / wall, records, learner


def paired_blocks(indexer, learner, pngs: list[bytes], rounds: int, steps: int, seed: int) -> dict:
    """Training images/s with the indexer on vs off, in alternating blocks of one process (step 4)."""
    images = decoded(pngs, learner.preset.resolution)
    budget, rng = indexer.budget, np.random.default_rng(seed)
    taken = [0]

    def train(submit: bool) -> float:
        """One step on the next batch (submitted to the indexer if `submit`); its seconds."""
        first = taken[0] * BATCH % (len(images) - BATCH + 1)
        taken[0] += 1
        result = learner.step(images[first:first + BATCH], None)
        if submit:
            budget.trained(result.seconds)
            indexer.submit([f"paired-{taken[0]}-{i}" for i in range(BATCH)], pngs[first:first + BATCH],
                           10_000, ["paired"] * BATCH)
        return result.seconds

    walls: dict[str, list[float]] = {"on": [], "off": []}
    steps_s = {"on": 0.0, "off": 0.0}
    for _ in range(rounds):
        for arm in rng.permutation(["on", "off"]):
            started = time.perf_counter()
            if arm == "on":
                for _ in range(steps):
                    with budget.turns:
                        steps_s["on"] += train(submit=True)
            else:
                with budget.turns:  # the indexer's next chunk waits for the block's end
                    steps_s["off"] += sum(train(submit=False) for _ in range(steps))
            walls[arm].append(time.perf_counter() - started)
    rate = {arm: steps * BATCH * rounds / sum(w) for arm, w in walls.items()}
    return {"images_per_second_on": round(rate["on"], 1), "images_per_second_off": round(rate["off"], 1),
            "ratio": round(rate["on"] / rate["off"], 3),
            "step_seconds": {arm: round(v, 2) for arm, v in steps_s.items()},
            "round_ratios": [round(off / on, 3) for on, off in zip(walls["on"], walls["off"], strict=True)],
            "config": {"rounds": rounds, "steps": steps}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=int, default=100_000)
    parser.add_argument("--experiences", type=int, default=5)
    parser.add_argument("--experience-images", type=int, default=2000)
    parser.add_argument("--share", type=float, default=0.10, help="the indexer's budget (TAILORD_INDEXER_SHARE)")
    parser.add_argument("--targets", type=int, default=64, help="held-out target images per domain")
    parser.add_argument("--rerank", type=int, nargs="+", default=[4, 16],
                        help="pool sizes (x the neighbours kept) re-ranked by the newest encoder")
    parser.add_argument("--warm-images", type=int, default=8000, help="prefill images the first encoder trains on")
    parser.add_argument("--paired-rounds", type=int, default=6, help="rounds of an on and an off block (step 4)")
    parser.add_argument("--paired-steps", type=int, default=20, help="training steps per paired block")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from deploy.compute_turns import ComputeTurns
    from deploy.index_budget import ComputeBudget
    from deploy.indexer import Encoder, Indexer, experience_checkpoints
    from replay.index_options import IndexOptions

    rng = np.random.default_rng(args.seed)
    pool, held_pixels = domain_pixels(args.seed, args.targets)
    experiences = []
    for i in range(args.experiences):
        domain = DOMAINS[(i + 1) % len(DOMAINS)]
        experiences.append((5 + i, domain, *stream(pool[domain], args.experience_images, rng, f"s{5 + i}")))
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp)
        probe = build_learner(state_dir)
        held = {name: decoded([augmented_png(p, rng) for p in pixels], probe.preset.resolution)
                for name, pixels in held_pixels.items()}
        indexer = Indexer(state_dir, 8 << 30, IndexOptions(threads=1), probe.backbone.feature_dim, "cpu",
                          probe.preset.resolution, budget=ComputeBudget(args.share, turns=ComputeTurns()))
        indexer.start()
        started = time.perf_counter()
        prefill(indexer, pool, args.store, rng)
        warm = [png for name in DOMAINS for png in stream(pool[name], args.warm_images // len(DOMAINS), rng, "w")[1]]
        train_experience(probe, [warm[i] for i in rng.permutation(len(warm))], lambda *_: None)
        start = save_checkpoint(probe, state_dir, 4)
        indexer.new_encoder(4, start)
        assert indexer.flush(None)
        setup_s = time.perf_counter() - started
        say(f"store of {indexer.index_size()} indexed in {setup_s:.0f} s")
        off, off_steps = run_off(state_dir, start, experiences)
        say(f"off: {off:.1f} images/s")
        on, records, learner = run_on(indexer, start, experiences, held, args.rerank)
        paired = paired_blocks(indexer, learner, experiences[-1][3], args.paired_rounds, args.paired_steps, args.seed)
        say(f"paired: {json.dumps(paired)}")
        upkeep = indexer.upkeep()
        newest = max(experience_checkpoints(state_dir / "checkpoints").items())
        stored = len(indexer.store.sample_ids(probe=False))
        rerank_seconds = rerank_cost(indexer, Encoder.load(*newest, "cpu"), sept_budgets(args.targets, stored),
                                     args.rerank)  # no step trains now, so the indexer's allowance stays spent
        indexer.stop()
    print(json.dumps({
        "images_per_second_on": round(on, 2), "images_per_second_off": round(off, 2),
        "ratio": round(on / off, 3), "paired": paired,
        "step_seconds_off": off_steps, "indexer_share": round(upkeep.share, 4),
        "indexer_seconds": {k: round(v, 2) for k, v in upkeep.seconds.items()},
        "experiences": records, "setup_seconds": round(setup_s, 1), "rerank_seconds": rerank_seconds,
        "config": {**vars(args), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "loadavg_1m": os.getloadavg()[0]},
    }))


if __name__ == "__main__":
    main()
