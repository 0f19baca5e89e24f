"""Checkpoint and resume (SIGKILL and SIGTERM), dynamics reuse, and the NaN guard."""
import json
import math
import os
import signal

import pytest
import torch
import tyro

import mopo
from conftest import comparable, run_dir_of, run_signalled_at

RUN = ["--env-id", "hopper-medium-v2", "--lam", "1.0", "--seed", "7", "--epochs", "4", "--steps-per-epoch", "150",
       "--rollout-freq", "50", "--rollout-batch-size", "200", "--eval-episodes", "2", "--dynamics-max-epochs", "3",
       "--log-freq", "25", "--batch-size", "64", "--checkpoint-freq", "1", "--eval-freq", "1", "--device", "cpu",
       "--torch-deterministic"]
# --device cpu: bit-for-bit resume is a CPU promise (main would pick CUDA where it is visible, with CUDA graphs)


def main_in(cwd, *cli):
    """mopo's CLI in this process (as `python mopo.py ...`, without a new interpreter's start-up)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return mopo.main(tyro.cli(mopo.Args, args=list(cli)))


@pytest.fixture(scope="module")
def reference(hopper_file, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    main_in(cwd, "--dataset-path", str(hopper_file), *RUN)
    return json.loads((run_dir_of(cwd) / "results.json").read_text()), run_dir_of(cwd)


def test_sigkill_then_resume_matches_uninterrupted_run(reference, hopper_file, tmp_path, capsys):
    """A real process killed for real as its 5th rollout round starts (update 201, mid-epoch 2): the checkpoint of
    update 150 and its evaluation are all there is."""
    proc = run_signalled_at(tmp_path, "rollout", 5, signal.SIGKILL, ["--dataset-path", hopper_file, *RUN])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    partial = json.loads((run_dir_of(tmp_path) / "results.json").read_text())
    assert [e["step"] for e in partial["evaluations"]] == [150]
    main_in(tmp_path, "--resume", str(run_dir_of(tmp_path)), "--epochs", "99")
    out = capsys.readouterr().out
    assert "resumed" in out and "ignoring ['epochs']" in out
    results = json.loads((run_dir_of(tmp_path) / "results.json").read_text())
    assert comparable(results) == comparable(reference[0])
    assert math.isfinite(results["final_normalized_score"])


def test_sigterm_writes_a_checkpoint_then_resume_matches(reference, hopper_file, tmp_path, monkeypatch, capsys):
    rollout, calls, before = mopo.rollout, [], signal.getsignal(signal.SIGTERM)

    def rollout_then_sigterm(*args, **kwargs):  # the 5th round starts update 201, mid-epoch 2
        calls.append(1)
        if len(calls) == 5:
            assert signal.getsignal(signal.SIGTERM) is not before  # main's handler, never pytest's own
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(*args, **kwargs)
    monkeypatch.setattr(mopo, "rollout", rollout_then_sigterm)
    with pytest.raises(SystemExit) as stopped:
        main_in(tmp_path, "--dataset-path", str(hopper_file), *RUN)
    assert stopped.value.code == 143 and "SIGTERM: checkpoint at update 201" in capsys.readouterr().out
    assert torch.load(run_dir_of(tmp_path) / "checkpoint.pt", weights_only=False)["step"] == 201  # where it stopped
    monkeypatch.setattr(mopo, "rollout", rollout)
    main_in(tmp_path, "--resume", str(run_dir_of(tmp_path)))
    results = json.loads((run_dir_of(tmp_path) / "results.json").read_text())
    assert comparable(results) == comparable(reference[0])


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt does not exist; --resume takes a run folder"):
        mopo.main(mopo.Args(resume=str(tmp_path)))


def tiny_args(dataset, **overrides):
    flags = dict(zip(RUN[::2], RUN[1::2]))
    kwargs = {k.lstrip("-").replace("-", "_"): v if k == "--device" else float(v) if "." in v else int(v)
              for k, v in flags.items() if k not in ("--env-id", "--torch-deterministic")}
    return mopo.Args(**{**kwargs, "epochs": 1, "dataset_path": str(dataset), **overrides})


def test_reusing_a_trained_dynamics_model(reference, hopper_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mopo, "train_dynamics", None)  # a run given --dynamics-path must not train a model
    results = mopo.main(tiny_args(hopper_file, dynamics_path=str(reference[1]), lam=0.0, rollout_length=2))
    assert results["dynamics"] == reference[0]["dynamics"]
    saved = torch.load(reference[1] / "dynamics.pt", map_location="cpu", weights_only=True)["state_dict"]
    copied = torch.load(run_dir_of(tmp_path) / "dynamics.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], copied[k]) for k in saved)  # every run folder holds its ensemble


@pytest.mark.parametrize("override, message", [
    ({"num_ensemble": 5, "num_elites": 3}, "num_ensemble 7 in the file vs 5 here; num_elites 5 in the file vs 3"),
    ({"dynamics_hidden_dim": 64}, "dynamics_hidden_dim 200 in the file vs 64 here"),
    ({"spectral_norm": True}, "spectral_norm False in the file vs True here"),
])
def test_dynamics_model_mismatch_is_a_clear_error(reference, hopper_file, tmp_path, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        mopo.main(tiny_args(hopper_file, dynamics_path=str(reference[1]), **override))
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_dynamics_model_for_other_dims_is_refused(reference):
    model = mopo.EnsembleDynamics(17, 6)
    with pytest.raises(ValueError, match="obs_dim 11 in the file vs 17 here; act_dim 3 in the file vs 6 here"):
        mopo.load_dynamics(str(reference[1] / "dynamics.pt"), model, "walker2d-medium-v2")
    with pytest.raises(FileNotFoundError, match="--dynamics-path"):
        mopo.load_dynamics(str(reference[1] / "nope.pt"), model, "walker2d-medium-v2")


def nan_after(n_calls, real):
    calls = []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) > n_calls:
            out = {**out, "losses/q_loss": torch.tensor(float("nan"))}
        return out
    return wrapped


def test_nan_loss_stops_the_run_naming_step_loss_and_checkpoint(hopper_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mopo, "sac_update", nan_after(60, mopo.sac_update))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FloatingPointError, match=r"non-finite losses/q_loss \(nan\) at update 75; .*checkpoint.pt"):
        mopo.main(tiny_args(hopper_file, epochs=2))
    assert signal.getsignal(signal.SIGTERM) is before  # the run's SIGTERM handler is gone


def test_nan_penalty_stops_the_run(hopper_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mopo, "penalty", lambda mean, logvar, kind: mean.new_full(mean.shape[1:2], float("nan")))
    with pytest.raises(FloatingPointError, match=r"non-finite rollout/penalty_mean \(nan\) at update 1"):
        mopo.main(tiny_args(hopper_file))


def test_nan_dynamics_loss_stops_before_policy_learning(hopper_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mopo, "gaussian_nll", lambda mean, logvar, target: mean.new_full(mean.shape[:1], float("inf")))
    with pytest.raises(FloatingPointError, match=r"non-finite dynamics/train_loss \(inf\) at dynamics epoch 1"):
        mopo.main(tiny_args(hopper_file))


def test_epochs_zero_trains_and_saves_only_the_model(hopper_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = mopo.main(tiny_args(hopper_file, epochs=0))
    assert results["evaluations"] == [] and results["final_normalized_score"] is None
    assert results["dynamics"]["epochs"] == 3 and (run_dir_of(tmp_path) / "dynamics.pt").is_file()


@pytest.mark.parametrize("epochs, steps", [(3, [0, 20, 30]), (4, [0, 20, 40])])
def test_policy_checkpoints_every_checkpoint_freq_epochs_and_once_at_the_end(epochs, steps, hopper_file, tmp_path,
                                                                             monkeypatch):
    """Before the first update, every --checkpoint-freq epochs, and after the last update once (no second write of
    the same checkpoint, which holds the whole model buffer), with every evaluation in it."""
    saved = []
    monkeypatch.setattr(mopo, "save_checkpoint", lambda run_dir, state: saved.append(
        (state["step"], len(state["results"]["evaluations"]))) if state["phase"] == "policy" else None)
    monkeypatch.chdir(tmp_path)
    mopo.main(tiny_args(hopper_file, epochs=epochs, steps_per_epoch=10, checkpoint_freq=2, rollout_freq=10))
    assert saved == [(step, step // 10) for step in steps]  # (update, evaluations held): one per epoch


def test_a_signal_during_an_evaluation_still_checkpoints_at_its_update(hopper_file, tmp_path, monkeypatch, capsys):
    """The epoch's checkpoint decision is taken before its evaluation; a SIGTERM that lands during the evaluation
    must still leave a checkpoint at that update (else up to --checkpoint-freq epochs are lost)."""
    evaluate = mopo.evaluate

    def evaluate_then_sigterm(*args, **kwargs):
        out = evaluate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(mopo, "evaluate", evaluate_then_sigterm)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        mopo.main(tiny_args(hopper_file, epochs=3, checkpoint_freq=10))  # no periodic checkpoint before the end
    assert "SIGTERM: checkpoint at update 150" in capsys.readouterr().out
    ckpt = torch.load(run_dir_of(tmp_path) / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 150 and [e["step"] for e in ckpt["results"]["evaluations"]] == [150]


def test_model_learning_logs_apart_so_an_early_policy_resume_keeps_its_curve(hopper_file, tmp_path, monkeypatch):
    """A resume drops the TensorBoard events after its checkpoint's update; the model's per-epoch scalars live in
    their own folder, so a resume at update 1 does not erase model epochs 2 and 3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rollout, calls = mopo.rollout, []

    def rollout_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(*args, **kwargs)
    monkeypatch.setattr(mopo, "rollout", rollout_then_sigterm)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        mopo.main(tiny_args(hopper_file))
    monkeypatch.setattr(mopo, "rollout", rollout)
    mopo.main(mopo.Args(resume=str(run_dir_of(tmp_path))))
    events = EventAccumulator(str(run_dir_of(tmp_path) / "dynamics"))
    events.Reload()
    assert [e.step for e in events.Scalars("dynamics/holdout_mse")] == [1, 2, 3]
    policy = EventAccumulator(str(run_dir_of(tmp_path)))
    policy.Reload()
    assert [e.step for e in policy.Scalars("eval/return")] == [150]


def test_a_renamed_checkpoint_still_resumes(reference, tmp_path):
    """What torch.load may unpickle follows the flag, not the file's name."""
    ckpt = torch.load(reference[1] / "checkpoint.pt", weights_only=False)
    renamed = tmp_path / "backup.pt"
    renamed.write_bytes((reference[1] / "checkpoint.pt").read_bytes())
    args, loaded = mopo.read_checkpoint(mopo.Args(resume=str(renamed)))
    assert loaded["step"] == ckpt["step"] and args.seed == 7
