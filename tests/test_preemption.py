"""Preemption during MODEL training (issue 9): a checkpoint after each dynamics epoch and, on SIGTERM, at the minibatch
where it landed; resuming ends with the same ensemble and the same results.json as a run never interrupted (CPU)."""
import copy
import json
import os
import signal
import types
from pathlib import Path

import pytest
import torch

import mopo
from conftest import run_signalled_at
from test_dynamics import known_system



# --- train_dynamics alone ---
class Preempted(Exception):
    pass


class SigtermAfter(list):
    """`train_dynamics`'s `sigterm` list, empty for its first `checks` truth tests and non-empty from then on: a
    SIGTERM landing at a chosen point (each minibatch tests it once, each epoch's end once)."""

    def __init__(self, checks):
        super().__init__()
        self.checks = checks

    def __bool__(self):
        self.checks -= 1
        return self.checks < 0


# 600 rows: 100 held out, 500 to train on, so 8 minibatches of 64 (the last one 52 rows) per epoch
ARGS = types.SimpleNamespace(num_ensemble=3, num_elites=2, holdout_size=100, dynamics_lr=3e-3, dynamics_batch_size=64,
                             dynamics_max_epochs=4)
BATCHES = 8
DATA = known_system(600)


def new_model(seed):
    torch.manual_seed(seed)
    return mopo.EnsembleDynamics(3, 2, num_ensemble=3, num_elites=2, hidden_dim=16)


def train(model, sigterm=(), state=None):
    """train_dynamics with a `save` that keeps what the real checkpoint keeps (the training state, the ensemble's
    weights, the RNG), copied at the moment of the call; stop=True ends the training there, as the real one exits."""
    saves = []

    def save(training, stop):
        saves.append({"training": copy.deepcopy(training), "stop": stop, "weights": copy.deepcopy(model.state_dict()),
                      "rng": torch.get_rng_state()})
        if stop:
            raise Preempted
    try:
        stats = mopo.train_dynamics(model, *DATA, ARGS, save=save, sigterm=sigterm, state=state)
    except Preempted:
        stats = None
    return stats, saves


def resume_from(saved):
    model = new_model(seed=123)  # other initial weights: everything must come from the checkpoint
    model.load_state_dict(saved["weights"])
    torch.set_rng_state(saved["rng"])
    stats, saves = train(model, state=saved["training"])
    return model, stats, saves


@pytest.fixture(scope="module")
def uninterrupted():
    model = new_model(seed=0)
    stats, saves = train(model)
    assert stats["epochs"] == 4 and [s["training"]["epoch"] for s in saves] == [1, 2, 3]
    assert not any(s["stop"] for s in saves)
    return model, stats, saves


def assert_same_ensemble(model, stats, reference):
    ref_model, ref_stats, _ = reference
    assert stats == ref_stats
    ref = ref_model.state_dict()
    assert model.state_dict().keys() == ref.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("checks, epoch, batch", [
    (3, 0, 3 * 64),  # mid-epoch 1, before its 4th minibatch
    (BATCHES, 1, 0),  # at the end of epoch 1 (its epoch-end save stops)
    (BATCHES + 1 + 5, 1, 5 * 64),  # mid-epoch 2
    (BATCHES + 1, 1, 0),  # as epoch 2 starts, its bootstraps already shuffled
    (0, 0, 0),  # before the first minibatch (the signal arrived while the data loaded)
], ids=["mid-epoch-1", "end-of-epoch-1", "mid-epoch-2", "start-of-epoch-2", "before-training"])
def test_sigterm_at_a_minibatch_then_resume_gives_the_same_ensemble(uninterrupted, checks, epoch, batch):
    model = new_model(seed=0)
    stats, saves = train(model, sigterm=SigtermAfter(checks))
    assert stats is None and saves[-1]["stop"], "the SIGTERM did not stop the training"
    stopped = saves[-1]["training"]
    assert (stopped["epoch"], stopped["batch"]) == (epoch, batch)
    assert "optimizer" in stopped
    resumed, stats, later_saves = resume_from(saves[-1])
    assert [s["training"]["epoch"] for s in later_saves] == list(range(epoch + 1, 4))  # saves go on after each epoch
    assert_same_ensemble(resumed, stats, uninterrupted)


def test_resume_from_an_epoch_checkpoint_gives_the_same_ensemble(uninterrupted):
    """SIGKILL: the last checkpoint is the one after an epoch; that epoch's work is kept, later work is redone."""
    resumed, stats, _ = resume_from(uninterrupted[2][1])  # after epoch 2
    assert_same_ensemble(resumed, stats, uninterrupted)


# --- whole runs, stopped by a real signal while the ensemble trains ---
FLAGS = dict(env_id="hopper-medium-v2", lam=1.0, seed=5, epochs=1, steps_per_epoch=20, rollout_freq=20,
             rollout_batch_size=100, eval_episodes=2, dynamics_max_epochs=8, dynamics_hidden_dim=32, batch_size=64,
             log_freq=10, device="cpu", torch_deterministic=True)
# 2000 rows: 400 held out, 1600 to train on: 7 minibatches of 256 per dynamics epoch


def run_dir_of(cwd):
    (run_dir,) = (Path(cwd) / "runs").iterdir()
    return run_dir


def comparable(results):
    return {k: v for k, v in results.items() if k != "run_name"}  # the folder name carries the start time


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
    """Send `sig` to this process as dynamics minibatch `at` (1-based) starts."""
    loss, calls, before = mopo.dynamics_loss, [], signal.getsignal(signal.SIGTERM)

    def counted(*args):
        calls.append(1)
        if len(calls) == at:
            assert signal.getsignal(signal.SIGTERM) is not before  # main's handler, never pytest's own
            os.kill(os.getpid(), sig)
        return loss(*args)
    monkeypatch.setattr(mopo, "dynamics_loss", counted)
    return before


def test_sigterm_during_model_training_checkpoints_at_the_minibatch_then_resume_matches(
        reference, hopper_file, tmp_path, monkeypatch, capsys):
    """A real SIGTERM as minibatch 10 (epoch 2's 3rd) starts: that minibatch finishes, the checkpoint is written at
    the next one, and the run exits 143; resumed, it ends as the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    before = signal_at_minibatch(10, signal.SIGTERM, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        mopo.main(mopo.Args(dataset_path=str(hopper_file), **FLAGS))
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # main's handler is gone with it
    run_dir = run_dir_of(tmp_path)
    where = Path("runs", run_dir.name)  # as main names it, relative to the folder it started in
    assert (f"SIGTERM: checkpoint at dynamics epoch 2 in {where / 'checkpoint.pt'}; continue with --resume "
            f"{where}") in capsys.readouterr().out
    monkeypatch.undo()  # the real dynamics_loss again
    ckpt = resume_and_compare(run_dir, reference, monkeypatch)
    assert (ckpt["training"]["epoch"], ckpt["training"]["batch"]) == (1, 3 * 256)


def test_sigkill_during_model_training_loses_at_most_one_epoch_then_resume_matches(reference, hopper_file, tmp_path,
                                                                                   monkeypatch):
    """SIGKILL as minibatch 17 (epoch 3's 3rd) starts: the checkpoint written after epoch 2 is all there is."""
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    proc = run_signalled_at(tmp_path, "dynamics_loss", 17, signal.SIGKILL, [*flags, f"--dataset-path={hopper_file}"])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt = resume_and_compare(run_dir_of(tmp_path), reference, monkeypatch)
    assert (ckpt["training"]["epoch"], ckpt["training"]["batch"]) == (2, 0)
