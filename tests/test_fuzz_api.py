"""Fuzzing the public API: every call returns or raises ``bn.BitNetError``; the process never dies.

Each target of ``fuzz_api.py`` runs in its own child process, so a segfault in a kernel
fails one test with the case to replay instead of killing pytest. The default run makes a
bounded number of calls per target (seconds); ``pytest -m slow`` makes many more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_api import TARGETS

SEED = 20261201
QUICK_CASES = {"model": 60, "config": 300}  # a model case runs a forward pass
DEFAULT_CASES = 150
TESTS = Path(__file__).resolve().parent


def run_target(target: str, seed: int, cases: int) -> None:
    """Run ``cases`` calls of ``target`` in a child; fail with the case (and its traceback or signal)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(TESTS / "fuzz_api.py"), target, str(seed), str(cases)],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=900, env=env)
    lines = done.stdout.strip().splitlines()
    last = lines[-1] if lines else "before the first case"
    if done.returncode < 0:
        pytest.fail(f"{target}: killed by {signal.Signals(-done.returncode).name} at {last} (seed {seed}); "
                    f"replay: python tests/fuzz_api.py {target} {seed} {cases}\n{done.stderr[-2000:]}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_public_api(target):
    run_target(target, SEED, QUICK_CASES.get(target, DEFAULT_CASES))


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_public_api_long(target):
    run_target(target, SEED + 1, 20 * QUICK_CASES.get(target, DEFAULT_CASES))
