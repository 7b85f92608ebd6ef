"""benchmarks/gpu_check.py: a clear skip without CUDA, and the summary it reads from each part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check  # noqa: E402 - a script, imported from its folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path needs a machine without CUDA")
def test_without_cuda_it_prints_one_skip_line_and_exits_0():
    proc = subprocess.run([sys.executable, str(Path(gpu_check.__file__))], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.strip().splitlines()
    assert "no CUDA device" in json.loads(line)["skipped"]


def test_last_json_takes_the_final_object_line():
    assert gpu_check.last_json('progress\n{"a": 1}\nnoise\n{"b": 2}\n') == {"b": 2}
    assert gpu_check.last_json("no json here\n[1, 2]\n") is None


def test_summary_reads_each_parts_figures_and_survives_a_failed_part():
    results = {
        "bare_step": {"images_per_second": 900.0},
        "daemon_pillow": {"daemon_images_per_second": 450.0, "ratio": 0.5,
                          "daemon": {"gpu_utilization_mean_percent": 41.0}},
        "daemon_nvjpeg": {"error": "ran past its 200 s limit"},
        "routing": {"flat": {"p50_ms": 12.5}, "ivf": {"p50_ms": 3.1}},
    }
    assert gpu_check.summary(results) == {
        "bare_step_images_per_second": 900.0,
        "daemon_pillow": {"images_per_second": 450.0, "ratio": 0.5, "gpu_utilization_mean_percent": 41.0},
        "daemon_nvjpeg": {"images_per_second": None, "ratio": None, "gpu_utilization_mean_percent": None},
        "route_p50_ms": {"flat": 12.5, "ivf": 3.1},
    }


def test_every_part_names_a_benchmark_that_exists():
    for command, limit in gpu_check.parts(100).values():
        assert (gpu_check.HERE / command[0]).is_file()
        assert limit > 0
    assert sum(limit for _, limit in gpu_check.parts(100).values()) <= 600  # the check fits 10 minutes
