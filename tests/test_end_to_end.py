"""Smoke: the CLI by subprocess and main(Args(...)) in-process, on a tiny hopper dataset."""
import json
import math
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

import mopo

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--steps-per-epoch", "50", "--rollout-freq", "25", "--rollout-batch-size", "200",
        "--eval-episodes", "2", "--eval-freq", "1", "--dynamics-max-epochs", "3", "--log-freq", "10",
        "--batch-size", "64"]


def check_results(results, run_dir):
    for key in ("env_id", "seed", "lam", "rollout_length", "final_normalized_score", "final_normalized_score_std",
                "final_return", "evaluations", "args"):
        assert key in results, key
    assert math.isfinite(results["final_normalized_score"]) and math.isfinite(results["final_return"])
    assert [e["step"] for e in results["evaluations"]] == [50, 100]
    assert all({"step", "return", "normalized_score"} <= set(e) for e in results["evaluations"])
    assert (run_dir / "dynamics.pt").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())


def test_cli_runs_to_completion(hopper_file, tmp_path):
    cmd = [sys.executable, str(ROOT / "mopo.py"), "--env-id", "hopper-medium-v2", "--dataset-path", str(hopper_file),
           "--lam", "1.0", "--save-model", *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "λ = 1.0 (--lam)" in proc.stdout and "h = 5 (task default)" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr and "dynamics: 0/3 epochs [" in proc.stdout  # no terminal: plain lines
    assert "epoch 2 step 100: return" in proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    check_results(results, run_dir)
    assert results["lam"] == 1.0 and results["rollout_length"] == 5 and results["args"]["lam"] == 1.0
    saved = torch.load(run_dir / "model.pt", weights_only=True)  # --save-model: SAC's state_dict
    assert {k.split(".")[0] for k in saved} == {"actor", "qf", "qf_target", "log_alpha"}


def test_main_in_process(hopper_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = mopo.Args(env_id="hopper-medium-replay-v2", dataset_path=str(hopper_file), seed=3,
                     **{k.lstrip("-").replace("-", "_"): float(v) if "." in v else int(v)
                        for k, v in zip(TINY[::2], TINY[1::2])})
    results = mopo.main(args)
    (run_dir,) = (tmp_path / "runs").iterdir()
    check_results(results, run_dir)
    assert results == json.loads((run_dir / "results.json").read_text())
    assert results["lam"] == 2.5 and results["rollout_length"] == 5  # the published hopper-medium-replay setting
    assert not (run_dir / "model.pt").exists()


def test_gymnasium_task_reports_raw_returns(tmp_path, monkeypatch):
    """A task D4RL lacks (here InvertedPendulum-v4) runs from --dataset-path and reports returns, no normalized score."""
    from conftest import make_d4rl_file
    path = make_d4rl_file(tmp_path / "pendulum.hdf5", "InvertedPendulum-v4", num_steps=1500)
    monkeypatch.chdir(tmp_path)
    flags = {k.lstrip("-").replace("-", "_"): int(v) for k, v in zip(TINY[::2], TINY[1::2])}
    results = mopo.main(mopo.Args(env_id="InvertedPendulum-v4", dataset_path=str(path), **flags))
    assert results["final_normalized_score"] is None and "normalized_score" not in results["evaluations"][-1]
    assert math.isfinite(results["final_return"]) and results["final_return"] >= 1  # at least one step alive
    assert (results["lam"], results["rollout_length"]) == (1.0, 5)


def test_gymnasium_task_needs_a_dataset_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="InvertedPendulum-v4 is not a D4RL task, so it needs --dataset-path"):
        mopo.main(mopo.Args(env_id="InvertedPendulum-v4"))


def test_track_starts_and_finishes_a_wandb_run(hopper_file, tmp_path, monkeypatch):
    """--track: make_writer starts a wandb run synced from TensorBoard, and main finishes it (a stand-in module)."""
    import types

    calls = []
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs["name"])),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(tmp_path)
    flags = {k.lstrip("-").replace("-", "_"): int(v) for k, v in zip(TINY[::2], TINY[1::2])}
    mopo.main(mopo.Args(env_id="hopper-medium-v2", dataset_path=str(hopper_file), track=True, device="cpu",
                        **flags | {"epochs": 1}))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert calls == [("init", run_dir.name), ("finish",)]


def test_without_a_terminal_progress_is_plain_lines(capsys):
    """A SLURM log: no carriage-return bars, a plain line at the start and then at most every `every` seconds."""
    progress = mopo.Progress("dynamics", 3, "epoch", every=0.0)
    for epoch in range(3):
        progress.set_postfix(holdout_mse=f"{0.5 / (epoch + 1):.4g}", refresh=False)
        progress.update(1)
    progress.close()
    out = capsys.readouterr().out
    assert "\r" not in out and out.splitlines()[0].startswith("dynamics: 0/3 epochs [")
    assert out.splitlines()[-1].startswith("dynamics: 3/3 epochs [") and "holdout_mse=0.1667" in out


def test_without_a_terminal_every_update_can_print_the_due_line(hopper_file, tmp_path, monkeypatch, capsys):
    """Lines are due by time, so each SAC update must reach the progress line, not only each --log-freq."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mopo, "Progress", partial(mopo.Progress, every=0.0))  # a line due at every update
    flags = {k.lstrip("-").replace("-", "_"): int(v) for k, v in zip(TINY[::2], TINY[1::2])}
    mopo.main(mopo.Args(dataset_path=str(hopper_file), device="cpu", **flags | {"epochs": 1, "log_freq": 1000}))
    out = capsys.readouterr().out
    assert "\r" not in out and [f"MOPO: {n}/50 updates [" in out for n in range(51)] == [True] * 51


def test_halfcheetah_leaves_no_mujoco_log_and_prints_no_warning(tmp_path, monkeypatch, capfd):
    """HalfCheetah-v4's XML uses MuJoCo's deprecated `settotalmass`: no warning printed, no MUJOCO_LOG.TXT written."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:  # pytest's own capture would hide a Python warning
        warnings.simplefilter("always")
        mopo.make_env(mopo.make_task("halfcheetah-medium-v2")).close()
    captured = capfd.readouterr()
    assert not [w for w in caught if "settotalmass" in str(w.message)]
    assert "settotalmass" not in captured.out + captured.err and list(tmp_path.iterdir()) == []
