"""benchmarks/ood_tasks.py: the paper's out-of-distribution tasks (Sec. 5.2), relabelled data and evaluation envs that
mopo.py runs through gymnasium's `module:EnvId` form."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mopo
import ood_tasks
from conftest import make_d4rl_file
from test_tasks import wrapped_steps

ROOT = Path(__file__).resolve().parents[1]
DIRECTION = np.array([math.cos(math.pi / 6), math.sin(math.pi / 6)])


def test_halfcheetah_jump_reward_equals_the_env_and_the_simulator():
    task = mopo.make_task("ood_tasks:HalfCheetah-jump-v0")
    assert (task.family, task.ref_min, task.file_name) == ("halfcheetah", None, None)
    for obs, act, next_obs, reward, qpos, qvel, init_qpos, _ in wrapped_steps(task):
        truth = min(qvel[0], 3.0) - 0.1 * np.square(act).sum() + 15.0 * (qpos[1] - init_qpos[1])
        relabelled = ood_tasks.halfcheetah_jump_reward(obs[None], act[None], next_obs[None])[0]
        assert reward == pytest.approx(truth, abs=1e-9) and relabelled == pytest.approx(truth, abs=1e-9)
    assert init_qpos[1] == 0.0  # z_init is a constant, so relabelling needs only the observation


def test_ant_angle_reward_equals_the_env_and_the_simulator():
    task = mopo.make_task("ood_tasks:Ant-angle-v0")
    assert task.family == "ant"
    steps = wrapped_steps(task)
    for obs, act, next_obs, reward, qpos, qvel, init_qpos, _ in steps:
        truth = qvel[:2] @ DIRECTION - 0.5 * np.square(act).sum() + 1.0  # contact forces zero, as in D4RL's data
        relabelled = ood_tasks.ant_angle_reward(obs[None], act[None], next_obs[None])[0]
        assert reward == pytest.approx(truth, abs=1e-9) and relabelled == pytest.approx(truth, abs=1e-9)
        assert next_obs.shape == (111,) and not next_obs[27:].any()
    assert np.ptp([s[5][1] for s in steps]) > 0.1  # y velocity varies, so the 30° direction is exercised


def test_jump_data_relabels_the_full_replay_file_and_mopo_runs_it_and_resumes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))  # the full-replay file as D4RL's cache holds it
    make_d4rl_file(tmp_path / "halfcheetah_full_replay-v2.hdf5", "HalfCheetah-v4", num_steps=600)
    original = mopo.load_dataset(tmp_path / "halfcheetah_full_replay-v2.hdf5", 17, 6)
    data = ood_tasks.relabel("halfcheetah-jump", None, str(tmp_path / "jump.hdf5"))
    written = mopo.load_dataset(tmp_path / "jump.hdf5", 17, 6)
    expected = ood_tasks.halfcheetah_jump_reward(original["observations"], original["actions"],
                                                 original["next_observations"])
    np.testing.assert_allclose(written["rewards"], expected, rtol=1e-6)
    assert not np.allclose(written["rewards"], original["rewards"]) and np.array_equal(data["rewards"],
                                                                                         written["rewards"])
    for key in ("observations", "actions", "next_observations", "terminals"):
        np.testing.assert_array_equal(written[key], original[key])
    cli = [sys.executable, str(ROOT / "mopo.py"), "--env-id", "benchmarks.ood_tasks:HalfCheetah-jump-v0",
           "--dataset-path", "jump.hdf5", "--epochs", "1", "--steps-per-epoch", "40", "--rollout-freq", "20",
           "--rollout-batch-size", "100", "--eval-episodes", "2", "--dynamics-max-epochs", "2", "--batch-size", "64"]
    proc = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # the README's form
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_normalized_score"] is None and math.isfinite(results["final_return"])
    resumed = subprocess.run([sys.executable, str(ROOT / "mopo.py"), "--resume", str(run_dir)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)  # a new process imports the module again
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-3000:]
