"""deploy/__init__: OpenMP threads sleep between parallel regions unless the environment says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import os, sys, deploy; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"


def policy(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_passive_by_default_and_set_before_torch_loads():
    assert policy(None) == "PASSIVE False"  # torch (and its OpenMP runtime) not loaded yet: the policy takes


def test_the_environment_wins():
    assert policy("ACTIVE") == "ACTIVE False"
