"""Backbone weights on disk: ``model.safetensors`` + ``manifest.json`` (never pickle).

A snapshot or checkpoint directory holds::

    model.safetensors   # backbone state_dict only (no SSL heads)
    manifest.json       # {"backbone": {"name", "class", "kwargs"},
                        #  "input": {"resolution", "mean", "std"},
                        #  "files": {"model.safetensors": "<sha256>", ...}, ...}

``load_snapshot(dir)`` rebuilds the backbone from the manifest and loads the
weights; without this package, ``ResNet18(**kwargs).load_state_dict(
safetensors.torch.load_file(".../model.safetensors"))`` does the same.
The backbone class is looked up in the registry by ``name`` (the manifest
never makes us import an arbitrary class path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from learners.backbones import BACKBONES, build_backbone
from safefiles.files import write_atomic

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def backbone_spec(backbone: nn.Module) -> dict[str, Any]:
    """The manifest's ``"backbone"`` entry: registry name, class path and kwargs."""
    cls = type(backbone)
    names = [name for name, registered in BACKBONES.items() if registered is cls]
    if not names:
        raise ValueError(f"{cls.__qualname__} is not a registered backbone")
    return {"name": names[0], "class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": backbone.config()}


def save_backbone(backbone: nn.Module, path: str | Path) -> str:
    """Write ``backbone``'s state_dict to ``path/model.safetensors`` atomically; return its sha256.

    Atomic (``safefiles.files.write_atomic``): a crash leaves either the old file or the
    new one, never a torn one.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors needs contiguous CPU tensors (channels_last weights are not contiguous).
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    data = safetensors.torch.save(state)
    write_atomic(directory / MODEL_FILE, data)
    return hashlib.sha256(data).hexdigest()


def backbone_from_spec(spec: dict[str, Any], state: dict[str, torch.Tensor], *, meta: bool = False) -> nn.Module:
    """The backbone a manifest's ``"backbone"`` entry describes, holding ``state``, in eval mode.

    Raises ``ValueError`` for an unknown name or a ``class`` that does not match the registry.
    With ``meta`` it is built on the meta device and assigned ``state``'s tensors: no weight
    init, so no draw from the global RNG (a thread beside training must not advance it).
    """
    with torch.device("meta") if meta else contextlib.nullcontext():
        backbone = build_backbone(spec["name"], spec.get("kwargs", {}))
    cls = type(backbone)
    if "class" in spec and spec["class"] != f"{cls.__module__}.{cls.__qualname__}":
        raise ValueError(f"manifest class {spec['class']!r} does not match backbone {spec['name']!r}")
    backbone.load_state_dict(state, assign=meta)
    return backbone.eval()


def load_snapshot(path: str | Path) -> nn.Module:
    """Rebuild the backbone described by ``path/manifest.json`` with its weights, in eval mode.

    Raises ``ValueError`` if the manifest names an unknown backbone, its class
    does not match the registry, or the weights' sha256 differs from
    ``manifest["files"]["model.safetensors"]`` (when listed).
    """
    directory = Path(path)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    data = (directory / MODEL_FILE).read_bytes()
    expected = manifest.get("files", {}).get(MODEL_FILE)
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ValueError(f"{directory / MODEL_FILE}: sha256 {actual} != manifest {expected}")
    return backbone_from_spec(manifest["backbone"], safetensors.torch.load(data))
