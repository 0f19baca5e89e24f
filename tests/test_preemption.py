"""Preemption during MODEL training: a checkpoint after each dynamics epoch; a SIGTERM stops the run at once, and
resuming from the last finished epoch ends with the same ensemble and results.json as a run never interrupted (CPU)."""
import copy
import json
import os
import signal
import types
from pathlib import Path

import pytest
import torch

import mopo
from conftest import comparable, run_dir_of, run_signalled_at
from test_dynamics import known_system

# --- train_dynamics alone ---
# 600 rows: 100 held out, 500 to train on, so 8 minibatches of 64 (the last one 52 rows) per epoch
ARGS = types.SimpleNamespace(num_ensemble=3, num_elites=2, holdout_size=100, dynamics_lr=3e-3, dynamics_batch_size=64,
                             dynamics_max_epochs=4)
DATA = known_system(600)


def new_model(seed):
    torch.manual_seed(seed)
    return mopo.EnsembleDynamics(3, 2, num_ensemble=3, num_elites=2, hidden_dim=16)


def train(model, state=None):
    """train_dynamics with an `on_epoch` that keeps what the real checkpoint keeps (the training state, the ensemble's
    weights, the RNG), copied at the moment of the call."""
    saves = []

    def on_epoch(training):
        saves.append({"training": copy.deepcopy(training), "weights": copy.deepcopy(model.state_dict()),
                      "rng": torch.get_rng_state()})
    return mopo.train_dynamics(model, DATA, ARGS, state=state, on_epoch=on_epoch), saves


@pytest.fixture(scope="module")
def uninterrupted():
    model = new_model(seed=0)
    stats, saves = train(model)
    assert stats["epochs"] == 4 and [s["training"]["epoch"] for s in saves] == [1, 2, 3]
    return model, stats, saves


def assert_same_ensemble(model, stats, reference):
    ref_model, ref_stats, _ = reference
    assert stats == ref_stats
    ref = ref_model.state_dict()
    assert model.state_dict().keys() == ref.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_resume_from_an_epoch_checkpoint_gives_the_same_ensemble(uninterrupted, epoch):
    saved = uninterrupted[2][epoch - 1]
    model = new_model(seed=123)  # other initial weights: everything must come from the checkpoint
    model.load_state_dict(saved["weights"])
    torch.set_rng_state(saved["rng"])
    stats, later = train(model, state=saved["training"])
    assert [s["training"]["epoch"] for s in later] == list(range(epoch + 1, 4))  # saves go on after each epoch
    assert_same_ensemble(model, stats, uninterrupted)


# --- whole runs, stopped by a real signal while the ensemble trains ---
FLAGS = dict(env_id="hopper-medium-v2", lam=1.0, seed=5, epochs=1, steps_per_epoch=20, rollout_freq=20,
             rollout_batch_size=100, eval_episodes=2, dynamics_max_epochs=8, dynamics_hidden_dim=32, batch_size=64,
             log_freq=10, device="cpu", torch_deterministic=True)
# 2000 rows: 400 held out, 1600 to train on: 7 minibatches of 256 per dynamics epoch


def ensemble(run_dir):
    return torch.load(run_dir / "dynamics.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(hopper_file, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        results = mopo.main(mopo.Args(dataset_path=str(hopper_file), **FLAGS))
    assert results["dynamics"]["epochs"] == 8 and len(results["evaluations"]) == 1
    return results, ensemble(run_dir_of(cwd))


def resume_and_compare(run_dir, reference, monkeypatch):
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["phase"] == "dynamics"
    assert not (run_dir / "dynamics.pt").exists() and not (run_dir / "results.json").exists()  # still training it
    monkeypatch.chdir(run_dir.parent.parent)
    results = mopo.main(mopo.Args(resume=str(run_dir)))
    assert comparable(results) == comparable(reference[0])
    assert comparable(json.loads((run_dir / "results.json").read_text())) == comparable(reference[0])
    weights = ensemble(run_dir)
    assert weights.keys() == reference[1].keys()
    assert all(torch.equal(weights[k], reference[1][k]) for k in weights)
    assert torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["phase"] == "policy"
    return ckpt


def signal_at_minibatch(at, sig, monkeypatch):
    """Send `sig` to this process as dynamics minibatch `at` (1-based) starts; returns the handler before, and the
    calls made."""
    loss, calls, before = mopo.dynamics_loss, [], signal.getsignal(signal.SIGTERM)

    def counted(*args):
        calls.append(1)
        if len(calls) == at:
            assert signal.getsignal(signal.SIGTERM) is not before  # main's handler, never pytest's own
            os.kill(os.getpid(), sig)
        return loss(*args)
    monkeypatch.setattr(mopo, "dynamics_loss", counted)
    return before, calls


def test_sigterm_during_model_training_stops_at_once_then_resume_matches(reference, hopper_file, tmp_path,
                                                                          monkeypatch, capsys):
    """A real SIGTERM as minibatch 10 (epoch 2's 3rd) starts: the run stops there (exit 143) with the checkpoint of
    epoch 1; resumed, it ends as the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    before, calls = signal_at_minibatch(10, signal.SIGTERM, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        mopo.main(mopo.Args(dataset_path=str(hopper_file), **FLAGS))
    assert stopped.value.code == 143 and len(calls) == 10  # at once: no further minibatch
    assert signal.getsignal(signal.SIGTERM) is before  # main's handler is gone with it
    run_dir = run_dir_of(tmp_path)
    where = Path("runs", run_dir.name)  # as main names it, relative to the folder it started in
    assert (f"SIGTERM: checkpoint at the last finished model epoch in {where / 'checkpoint.pt'}; continue with "
            f"--resume {where}") in capsys.readouterr().out
    monkeypatch.undo()  # the real dynamics_loss again
    ckpt = resume_and_compare(run_dir, reference, monkeypatch)
    assert ckpt["training"]["epoch"] == 1


def test_sigterm_before_the_first_epoch_ends_leaves_nothing_to_resume(hopper_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    signal_at_minibatch(3, signal.SIGTERM, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        mopo.main(mopo.Args(dataset_path=str(hopper_file), **FLAGS))
    assert stopped.value.code == 143 and "SIGTERM: stopped; nothing new was saved" in capsys.readouterr().out
    assert not (run_dir_of(tmp_path) / "checkpoint.pt").exists()


def test_sigkill_during_model_training_loses_at_most_one_epoch_then_resume_matches(reference, hopper_file, tmp_path,
                                                                                   monkeypatch):
    """SIGKILL as minibatch 17 (epoch 3's 3rd) starts: the checkpoint written after epoch 2 is all there is."""
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    proc = run_signalled_at(tmp_path, "dynamics_loss", 17, signal.SIGKILL, [*flags, f"--dataset-path={hopper_file}"])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt = resume_and_compare(run_dir_of(tmp_path), reference, monkeypatch)
    assert ckpt["training"]["epoch"] == 2
