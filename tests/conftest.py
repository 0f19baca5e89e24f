"""Shared fixtures: tiny datasets in D4RL layout, made from gymnasium MuJoCo envs with random actions."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_dataset import make_dataset  # noqa: E402


def make_d4rl_file(path, gym_id="Hopper-v4", num_steps=2000, max_episode_steps=1000, seed=0, **gym_kwargs):
    make_dataset(path, gym_id, num_steps, max_episode_steps, seed, **gym_kwargs)
    return path


@pytest.fixture(scope="session")
def hopper_file(tmp_path_factory):
    return make_d4rl_file(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5")


# mopo.py's command line, with a counter on one of mopo's functions that signals its own process at one of its calls
SIGNAL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import mopo, tyro
real, calls = mopo.{name}, []

def counted(*args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        os.kill(os.getpid(), {sig})
    return real(*args, **kwargs)

mopo.{name} = counted
mopo.main(tyro.cli(mopo.Args))
"""


def run_dir_of(cwd):
    (run_dir,) = (Path(cwd) / "runs").iterdir()
    return run_dir


def comparable(results):
    return {k: v for k, v in results.items() if k != "run_name"}  # the folder name carries the start time


def run_signalled_at(cwd, name, at, sig, cli):
    """`python mopo.py *cli` in a new process that sends itself `sig` as its `at`-th call of `mopo.<name>` starts: a
    signal at a chosen point of the run, decided by the run itself, not by a clock."""
    code = SIGNAL_AT.format(root=str(ROOT), name=name, at=at, sig=int(sig))
    return subprocess.run([sys.executable, "-c", code, *map(str, cli)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
