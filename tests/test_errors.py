"""Bad input: one clear error per row, raised before any training (no run folder is even created)."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import mopo

ROOT = Path(__file__).resolve().parents[1]


def rewrite(src, dst, change):
    """Copy a D4RL-layout file, letting change(dict of arrays) edit it."""
    with h5py.File(src) as f:
        data = {k: f[k][()] for k in f}
    change(data)
    with h5py.File(dst, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    return dst


def drop(key):
    return lambda d: d.pop(key)


def nan_in(key, value=np.nan):
    def change(d):
        d[key] = d[key].astype(np.float32)
        d[key][3] = value
    return change


DATA_ROWS = {  # name: (edit of the tiny hopper file, env id, error, message)
    "missing key": (drop("rewards"), "hopper-medium-v2", ValueError, r"lacks key\(s\) \['rewards'\]"),
    "mismatched lengths": (lambda d: d.update(actions=d["actions"][:-5]), "hopper-medium-v2", ValueError,
                           r"actions has shape \(1995, 3\), expected \(2000, 3\) \(a row per transition"),
    "obs dim of another env": (None, "walker2d-medium-v2", ValueError,
                               r"observations has shape \(2000, 11\), expected \(2000, 17\)"),
    "action dim": (lambda d: d.update(actions=d["actions"][:, :2]), "hopper-medium-v2", ValueError,
                   r"actions has shape \(2000, 2\), expected \(2000, 3\)"),
    "NaN": (nan_in("observations"), "hopper-medium-v2", ValueError, "observations holds NaN or inf"),
    "inf": (nan_in("rewards", np.inf), "hopper-medium-v2", ValueError, "rewards holds NaN or inf"),
}


@pytest.mark.parametrize("row", list(DATA_ROWS))
def test_bad_dataset(row, hopper_file, tmp_path, monkeypatch):
    change, env_id, error, message = DATA_ROWS[row]
    path = rewrite(hopper_file, tmp_path / "edited.hdf5", change) if change else hopper_file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        mopo.main(mopo.Args(env_id=env_id, dataset_path=str(path)))
    assert not (tmp_path / "runs").exists()


FLAG_ROWS = [
    ({"env_id": "hopper-medium-v9"}, ValueError, "unknown --env-id 'hopper-medium-v9'; valid D4RL ids: {hopper,halfcheetah,walker2d,ant}-{random,medium,medium-replay,medium-expert,expert,full-replay}-v2"),
    ({"dataset_path": "/nonexistent/file.hdf5"}, FileNotFoundError, "does not exist; check --dataset-path"),
    ({"lam": -0.5}, ValueError, "--lam must be >= 0, got -0.5"),
    ({"rollout_length": 0}, ValueError, "--rollout-length must be >= 1, got 0"),
    ({"real_ratio": -0.1}, ValueError, r"--real-ratio must be in \[0, 1\], got -0.1"),
    ({"real_ratio": 1.5}, ValueError, r"--real-ratio must be in \[0, 1\], got 1.5"),
    ({"num_elites": 8}, ValueError, r"--num-elites must be <= --num-ensemble, got 8 > 7"),
    ({"num_elites": 0}, ValueError, "--num-elites must be >= 1, got 0"),
    ({"tau": 0.0}, ValueError, r"--gamma must be in \[0, 1\] and --tau in \(0, 1\]"),
    ({"alpha": 0.0}, ValueError, "--alpha must be > 0, got 0.0"),
    ({"batch_size": 0}, ValueError, "--batch-size must be >= 1, got 0"),
    ({"dynamics_batch_size": 0}, ValueError, "--dynamics-batch-size must be >= 1, got 0"),
    ({"rollout_batch_size": -3}, ValueError, "--rollout-batch-size must be >= 1, got -3"),
    ({"epochs": -1}, ValueError, "--epochs must be >= 0, got -1"),
]


@pytest.mark.parametrize("flags, error, message", FLAG_ROWS)
def test_bad_flag(flags, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        mopo.main(mopo.Args(**flags))
    assert not (tmp_path / "runs").exists()


def test_not_hdf5(tmp_path, monkeypatch):
    (tmp_path / "data.hdf5").write_text("a,b,c\n1,2,3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is not a readable hdf5 file"):
        mopo.main(mopo.Args(dataset_path=str(tmp_path / "data.hdf5")))


def devices_here():
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu", *cuda] + ["mps"] * torch.backends.mps.is_available()


UNUSABLE = ["gpu0", "cdua", "xpu", "cuda:-1", f"cuda:{torch.cuda.device_count()}"]  # a misspelling; past the count
UNUSABLE += [] if torch.backends.mps.is_available() else ["mps"]  # an Apple device elsewhere
UNUSABLE += [] if torch.cuda.is_available() else ["cuda"]


@pytest.mark.parametrize("device", UNUSABLE)
def test_a_device_torch_cannot_use_is_one_error_naming_this_machines(device, tmp_path, monkeypatch):
    """Checked before anything loads: no dataset exists here, yet the device is the error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        mopo.main(mopo.Args(device=device, dataset_path="none.hdf5"))
    assert str(error.value) == (f"--device {device!r}: torch cannot use it here; this machine has "
                                f"{', '.join(devices_here())} (or auto)")
    assert not (tmp_path / "runs").exists()


def test_the_cli_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "mopo.py"), "--device", "xpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: --device 'xpu': torch cannot use it here; this machine has " \
                                  f"{', '.join(devices_here())} (or auto)"


def test_every_device_this_machine_has_is_accepted():
    for device in devices_here():
        assert str(mopo.check_args(mopo.Args(device=device))) == device
    assert mopo.check_args(mopo.Args(device="auto")).type == ("cuda" if torch.cuda.is_available() else "cpu")


# --- files mopo.py reads back: damaged or foreign, each ends the run with one line ---
def damaged_files(tmp_path, good):
    """name: a file standing where `good` (a real checkpoint.pt or dynamics.pt) should be."""
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file" * 50)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.pt").write_text("step,return\n1,2\n")
    return ("foreign.pt", "garbage.pt", "empty.pt", "truncated.pt", "text.pt")


@pytest.fixture(scope="module")
def finished_run(hopper_file, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        mopo.main(mopo.Args(dataset_path=str(hopper_file), epochs=1, steps_per_epoch=10, rollout_freq=10,
                            rollout_batch_size=50, eval_episodes=1, dynamics_max_epochs=1, dynamics_hidden_dim=16,
                            batch_size=32, device="cpu"))
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


@pytest.mark.parametrize("flag, good", [("resume", "checkpoint.pt"), ("dynamics_path", "dynamics.pt")])
def test_damaged_or_foreign_files_are_one_clear_error(flag, good, finished_run, hopper_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in damaged_files(tmp_path, finished_run / good):
        path = tmp_path / name
        if flag == "resume":  # --resume takes a folder or its checkpoint.pt
            (tmp_path / name.replace(".pt", "")).mkdir()
            path = path.rename(tmp_path / name.replace(".pt", "") / "checkpoint.pt")
        message = ("lacks .*not what mopo.py writes there" if name == "foreign.pt" else
                   r"is damaged or not a torch file \(\w+Error\b")  # the detail names what torch raised
        with pytest.raises(ValueError, match=f"{path} {message}.*; --{flag.replace('_', '-')} takes a run folder"):
            mopo.main(mopo.Args(dataset_path=str(hopper_file), **{flag: str(path)}))
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_of_another_kind_is_refused(finished_run, tmp_path):
    """dynamics.pt given to --resume: a torch file, but not a checkpoint."""
    (tmp_path / "checkpoint.pt").write_bytes((finished_run / "dynamics.pt").read_bytes())
    with pytest.raises(ValueError, match=r"lacks \['phase', 'args', 'data_fingerprint', 'rng'\]"):
        mopo.main(mopo.Args(resume=str(tmp_path)))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(finished_run, tmp_path):
    ckpt = torch.load(finished_run / "checkpoint.pt", weights_only=True)  # what mopo.py writes loads safely
    ckpt["results"]["note"] = Payload()
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "mopo.py"), "--resume", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not (tmp_path / "ran").exists()  # the payload never ran
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: {tmp_path / 'checkpoint.pt'} holds a pickled object, refused: it could run code (GLOBAL "
                    f"posix.mkdir); --resume takes a run folder or its checkpoint.pt; start afresh without it")


class Payload:
    """Unpickled, it would make the folder `ran` in the working directory."""

    def __reduce__(self):
        return os.mkdir, ("ran",)


def test_cli_prints_one_line_for_a_damaged_checkpoint(finished_run, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes((finished_run / "checkpoint.pt").read_bytes()[:1000])
    proc = subprocess.run([sys.executable, str(ROOT / "mopo.py"), "--resume", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'checkpoint.pt'} is damaged or not a torch file (")
