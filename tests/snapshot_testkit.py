"""Tiny tailord state dirs for the indexer/snapshot tests: coloured PNGs and width-8 checkpoints.

Experience N stores noisy images of one colour; `exp-00000N/` holds a SimSiam method
on `ResNet18(width=8, small_stem=True)` (random weights: colour alone separates the
experiences), written with `deploy.checkpoints.write_checkpoint` like the daemon does.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from deploy.checkpoints import write_checkpoint
from deploy.indexer import Indexer
from learners.augment import IMAGENET_MEAN, IMAGENET_STD
from learners.backbones import ResNet18
from learners.methods import build_method
from replay.index_options import IndexOptions

RES = 16
KWARGS = {"width": 8, "small_stem": True, "stem_stride": 1}
COLOURS = {"red": (210, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 210),
           "dark-blue": (10, 10, 90), "light-blue": (120, 120, 255)}


def colour_png(colour: str, seed: int, size: int = 24) -> bytes:
    """A PNG of `colour` with per-pixel noise (distinct bytes for every seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 20, (size, size, 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_experience_checkpoint(state_dir: Path, experience: int, seed: int, dead: bool = False) -> Path:
    """`checkpoints/exp-{experience:06d}/` as the daemon writes it; `dead` zeroes the backbone
    (constant features: a checkpoint useless for any task)."""
    torch.manual_seed(seed)
    method = build_method("simsiam", ResNet18(**KWARGS))
    if dead:
        for param in method.backbone.parameters():
            param.data.zero_()
    manifest = {
        "kind": "experience", "experience": experience, "method": "simsiam", "preset": "cpu",
        "backbone": {"name": "resnet18", "class": "learners.backbones.ResNet18", "kwargs": KWARGS},
        "input": {"resolution": RES, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    state = {k: v.contiguous() for k, v in method.state_dict().items()}
    writers = {"model.safetensors": lambda p: save_file(state, str(p))}
    return write_checkpoint(state_dir / "checkpoints", f"exp-{experience:06d}", writers, manifest).path


def open_indexer(state_dir: Path, **kwargs) -> Indexer:
    options = {"store_max_bytes": 1 << 30, "index_options": IndexOptions(exact_max=10_000),
               "feature_dim": 8 * KWARGS["width"], "device": "cpu", "decode_size": RES, **kwargs}
    indexer = Indexer(state_dir, **options)
    indexer.start()
    return indexer


def submit_colour(indexer: Indexer, experience: int, colour: str, n: int, probes: int = 0,
                  first_seed: int = 0) -> list[str]:
    """Submit `n` training samples and `probes` probe samples of `colour`; returns the training ids."""
    seeds = range(first_seed, first_seed + n + probes)
    ids = [f"{colour}-{experience}-{s}" for s in seeds]
    encoded = [colour_png(colour, 1000 * experience + s) for s in seeds]
    indexer.submit(ids[:n], encoded[:n], experience, [colour] * n)
    if probes:
        indexer.submit(ids[n:], encoded[n:], experience, [colour] * probes, probes=True)
    return ids[:n]


def build_state(state_dir: Path, colours: dict[int, str], n: int = 24, probes: int = 4,
                dead: frozenset[int] = frozenset()) -> Path:
    """A stopped daemon's state: experience e stores `n` (+ `probes`) images of `colours[e]`."""
    indexer = open_indexer(state_dir)
    try:
        for experience, colour in sorted(colours.items()):
            submit_colour(indexer, experience, colour, n, probes)
            path = write_experience_checkpoint(state_dir, experience, seed=experience,
                                               dead=experience in dead)
            indexer.new_encoder(experience, path)
        assert indexer.flush(60)
    finally:
        indexer.stop()
    return state_dir


def target_images(colour: str, n: int, first_seed: int = 90_000) -> list[tuple[str, bytes]]:
    return [(f"{colour}-{i}.png", colour_png(colour, first_seed + i)) for i in range(n)]
