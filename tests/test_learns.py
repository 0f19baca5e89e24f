"""benchmarks/learns.py and make_dataset.py: the datasets follow D4RL's recipes (the benchmark itself is not a test)."""
import json

import h5py
import numpy as np
import pytest
import torch

import learns
import make_dataset
import mopo


def test_halfcheetah_random_data_is_d4rls_recipe(tmp_path):
    path, summary = learns.write_dataset("halfcheetah-random", tmp_path, transitions=2500)
    with h5py.File(path) as f:
        timeouts, terminals, actions = f["timeouts"][()], f["terminals"][()], f["actions"][()]
        first = f["observations"][:5].copy()
    assert np.flatnonzero(timeouts).tolist() == [999, 1999] and not terminals.any()  # 1,000-step episodes, no falls
    assert actions.shape == (2500, 6) and -1 <= actions.min() < -0.99 and 0.99 < actions.max() <= 1
    assert abs(actions.mean()) < 0.02 and abs(actions.std() - 1 / np.sqrt(3)) < 0.01  # uniform in [-1, 1]
    data = mopo.load_dataset(path, 17, 6)  # mopo.py reads it as halfcheetah-random-v2's file
    assert len(data["rewards"]) == 2500
    low, high = mopo.D4RL_FAMILIES["halfcheetah"][2:]
    assert summary["episodes"] == 2 and summary["normalized_score"] == pytest.approx(
        100 * (summary["mean_return"] - low) / (high - low))
    (tmp_path / "again").mkdir()
    again, _ = learns.write_dataset("halfcheetah-random", tmp_path / "again", transitions=2500)
    with h5py.File(again) as f:
        np.testing.assert_array_equal(f["observations"][:5], first)  # a fixed seed


def test_a_dataset_made_by_the_same_recipe_is_kept_and_any_change_writes_it_again(tmp_path, monkeypatch):
    path, summary = learns.write_dataset("halfcheetah-random", tmp_path, transitions=1500)
    written = []
    monkeypatch.setattr(learns, "make_dataset", lambda *a, **k: written.append(a) or make_dataset.make_dataset(*a, **k))
    assert learns.write_dataset("halfcheetah-random", tmp_path, transitions=1500) == (path, summary) and not written
    learns.write_dataset("halfcheetah-random", tmp_path, transitions=1000)  # another size
    learns.write_dataset("halfcheetah-random", tmp_path, transitions=1000)
    with open(path, "r+b") as f:  # cut off while it was written
        f.truncate(path.stat().st_size // 2)
    learns.write_dataset("halfcheetah-random", tmp_path, transitions=1000)
    monkeypatch.setattr(learns, "HERE", tmp_path)  # make_dataset.py or mopo.py changed (here: gone)
    learns.write_dataset("halfcheetah-random", tmp_path, transitions=1000)
    assert [a[2] for a in written] == [1000, 1000, 1000]  # the new size once, then after each change


def test_the_medium_recipe_trains_saves_and_regenerates_exactly(tmp_path):
    """make_dataset.py at a tiny budget: online SAC with mopo.py's own update stops at the first evaluation that
    reaches the target (here at once) and saves its actor and how it was made; its replay buffer is D4RL's layout
    (medium-replay); `medium` is the actor's stochastic actions, the same file from the same actor and seed."""
    info = make_dataset.train_behaviour("Hopper-v4", -1e9, tmp_path / "hopper_medium_actor.pt",
                                        tmp_path / "hopper_medium_replay.hdf5", max_steps=400, warmup_steps=60,
                                        eval_every=100, eval_episodes=2)
    assert info["steps"] == 100 and len(info["evaluations"]) == 1 and info["target_entropy"] == -3.0
    actor, saved = make_dataset.load_actor(tmp_path / "hopper_medium_actor.pt")
    assert saved == info and saved["eval_return"] == pytest.approx(saved["evaluations"][0]["return"])
    replay = mopo.load_dataset(tmp_path / "hopper_medium_replay.hdf5", 11, 3)
    assert len(replay["rewards"]) == 100  # every step up to the stopping one
    np.testing.assert_array_equal(replay["observations"][1:][~replay["terminals"][:-1].astype(bool)],
                                  replay["next_observations"][:-1][~replay["terminals"][:-1].astype(bool)])
    with pytest.raises(RuntimeError, match="no evaluation reached 1000000000.0 in 100 steps"):
        make_dataset.train_behaviour("Hopper-v4", 1e9, tmp_path / "never.pt", max_steps=100, warmup_steps=60,
                                     eval_every=50, eval_episodes=1)
    assert not (tmp_path / "never.pt").exists()

    files = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        path, summary = learns.write_dataset("hopper-medium", tmp_path / folder, transitions=300, behaviour=tmp_path)
        with h5py.File(path) as f:
            files.append({k: f[k][()] for k in f})
    assert set(files[0]) == {"observations", "actions", "rewards", "next_observations", "terminals", "timeouts"}
    for k in files[0]:
        np.testing.assert_array_equal(files[0][k], files[1][k])  # regenerated exactly
    obs, act = (torch.as_tensor(files[0][k]) for k in ("observations", "actions"))
    with torch.no_grad():
        assert not torch.allclose(act, actor.act(obs), atol=1e-3)  # the stochastic actions, not the mean
    assert summary["transitions"] == 300 and "normalized_score" in summary  # hopper-medium-v2's reference scores


def test_runs_already_saved_are_found_by_task_seed_and_variant(tmp_path):
    """A later call of learns.py runs only what run_results/ lacks; the table counts each run's broken bounds."""
    for name in ("hopper-medium-v2__hopper-medium-model-s1__1__10", "hopper-medium-v2__hopper-medium-mopo-s1__1__11",
                 "hopper-medium-v2__hopper-medium-lam2.5-s1__1__12", "hopper-medium-v2__hopper-medium-lam0-s2__2__13"):
        (tmp_path / "run_results" / name).mkdir(parents=True)
        (tmp_path / "run_results" / name / "results.json").write_text(json.dumps({"run_name": name}))
    found = learns.saved_runs(tmp_path)
    assert {k: sorted(v) for k, v in found.items()} == {("hopper-medium", 1): ["lam2.5", "model", "mopo"],
                                                        ("hopper-medium", 2): ["lam0"]}
    assert found[("hopper-medium", 1)]["lam2.5"]["run_name"].endswith("__12")
    assert learns.bound({"evaluations": [{"bound_broken": 1.0}, {"bound_broken": 0.0}, {}]}) == "1/3"


def test_a_run_an_earlier_call_left_unfinished_resumes_from_its_folder(tmp_path):
    """A call cut off mid-run (SIGTERM, SIGKILL, a shutdown) leaves its run's checkpoint; the next call resumes it."""
    assert learns.resume_flags(tmp_path, "hopper-medium-mopo-s1") == []  # nothing there: a new run
    for name in ("hopper-medium-v2__hopper-medium-mopo-s1__1__10", "hopper-medium-v2__hopper-medium-mopo-s1__1__11",
                 "hopper-medium-v2__hopper-medium-lam0-s1__1__12", "hopper-medium-v2__hopper-medium-mopo-s2__2__13"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    assert learns.resume_flags(tmp_path, "hopper-medium-mopo-s1") == []  # folders without a checkpoint: a new run
    for name in ("hopper-medium-v2__hopper-medium-mopo-s1__1__10", "hopper-medium-v2__hopper-medium-mopo-s1__1__11",
                 "hopper-medium-v2__hopper-medium-mopo-s2__2__13"):
        (tmp_path / "runs" / name / "checkpoint.pt").touch()
    assert learns.resume_flags(tmp_path, "hopper-medium-mopo-s1") == [
        "--resume", "runs/hopper-medium-v2__hopper-medium-mopo-s1__1__11"]  # the newest, relative to where jobs run
    assert learns.resume_flags(tmp_path, "hopper-medium-lam0-s1") == []
