"""D4RL loading (D12): layout, cache, download through file:// and a loopback HTTP server, clear errors."""
import functools
import os
import http.server
import threading

import h5py
import numpy as np
import pytest

import mopo
from conftest import make_d4rl_file


def test_tiny_file_loads_with_the_right_shapes(hopper_file):
    data = mopo.load_dataset(hopper_file, 11, 3)
    n = len(data["observations"])
    assert n == 2000
    assert data["observations"].shape == data["next_observations"].shape == (n, 11)
    assert data["actions"].shape == (n, 3) and data["rewards"].shape == data["terminals"].shape == (n,)
    assert all(v.dtype == np.float32 for v in data.values())
    assert 0 < data["terminals"].sum() < n  # random hopper falls over: real terminals are present


def test_timeouts_are_not_terminals(tmp_path):
    path = make_d4rl_file(tmp_path / "cheetah.hdf5", "HalfCheetah-v4", num_steps=120, max_episode_steps=50)
    with h5py.File(path) as f:
        assert f["timeouts"][()].sum() == 2  # episodes cut by the time limit...
    assert mopo.load_dataset(path, 17, 6)["terminals"].sum() == 0  # ...are not terminal states


def test_d4rl_file_names_and_urls():
    task = mopo.make_task("hopper-medium-replay-v2")
    assert task.file_name == "hopper_medium_replay-v2.hdf5" and task.gym_id == "Hopper-v4"
    assert mopo.D4RL_URL.format(file=task.file_name) == (
        "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5")
    ant = mopo.make_task("ant-medium-expert-v2")
    assert ant.gym_kwargs == {"use_contact_forces": True} and ant.file_name == "ant_medium_expert-v2.hdf5"


@pytest.mark.parametrize("env_id", ["hopper-medium-v0", "humanoid-medium-v2", "hopper-mediocre-v2", "Humanoid-v4", "CartPole-v9", ""])
def test_unknown_env_id_lists_valid_ids(env_id):
    with pytest.raises(ValueError, match="unknown --env-id.*{hopper,halfcheetah,walker2d,ant}-{random,medium,medium-replay"):
        mopo.make_task(env_id)


def test_cache_is_d4rls_own(hopper_file, tmp_path, monkeypatch):
    """$D4RL_DATASET_DIR, else ~/.d4rl/datasets: a file the d4rl package fetched is used, never fetched again."""
    monkeypatch.setattr(mopo, "download", None)  # no download may be attempted
    task = mopo.make_task("hopper-medium-v2")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / task.file_name).write_bytes(hopper_file.read_bytes())
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    assert len(mopo.get_dataset(task, None, 11, 3)["rewards"]) == 2000
    monkeypatch.delenv("D4RL_DATASET_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".d4rl" / "datasets").mkdir(parents=True)
    (tmp_path / "cache" / task.file_name).rename(tmp_path / ".d4rl" / "datasets" / task.file_name)
    assert len(mopo.get_dataset(task, None, 11, 3)["rewards"]) == 2000


def test_download_from_file_url_into_this_processs_own_part_file(hopper_file, tmp_path):
    """Two runs filling one cache at once (a sweep's model jobs) must not write into the same .part file."""
    part = mopo.download(hopper_file.as_uri(), tmp_path / "cache" / "hopper_medium-v2.hdf5")
    assert part.read_bytes() == hopper_file.read_bytes() and part.name.endswith(f".{os.getpid()}.part")


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/{{file}}"
    server.shutdown()


def test_get_dataset_downloads_into_the_d4rl_cache_then_reuses_it(hopper_file, tmp_path, monkeypatch, http_server):
    root, url = http_server
    (root / "hopper_medium-v2.hdf5").write_bytes(hopper_file.read_bytes())
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setattr(mopo, "D4RL_URL", url)
    task = mopo.make_task("hopper-medium-v2")
    data = mopo.get_dataset(task, None, 11, 3)
    assert (tmp_path / "d4rl" / "hopper_medium-v2.hdf5").is_file() and len(data["rewards"]) == 2000
    (root / "hopper_medium-v2.hdf5").unlink()  # the server no longer has it: the cached copy must be used
    assert len(mopo.get_dataset(task, None, 11, 3)["rewards"]) == 2000


def test_network_error_names_url_and_cache_path(tmp_path, http_server):
    _, url = http_server
    dest = tmp_path / "cache" / "walker2d_medium-v2.hdf5"
    with pytest.raises(ConnectionError, match=f"could not download .*missing.hdf5 .*place the file at "
                                              f"{dest} by hand, or pass --dataset-path"):
        mopo.download(url.format(file="missing.hdf5"), dest)
    assert list(dest.parent.iterdir()) == []


def test_wrong_obs_dim_is_a_clear_error(hopper_file):
    with pytest.raises(ValueError, match=r"observations has shape \(2000, 11\), expected \(2000, 17\).*--env-id"):
        mopo.load_dataset(hopper_file, 17, 6)


def test_missing_key_is_a_clear_error(tmp_path, hopper_file):
    path = tmp_path / "no_next.hdf5"
    with h5py.File(hopper_file) as src, h5py.File(path, "w") as dst:
        for k in ("observations", "actions", "rewards", "terminals"):
            dst.create_dataset(k, data=src[k][()])
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['next_observations'\]"):
        mopo.load_dataset(path, 11, 3)


def test_not_hdf5_and_missing_file(tmp_path):
    bad = tmp_path / "bad.hdf5"
    bad.write_text("not an hdf5 file")
    with pytest.raises(ValueError, match="not a readable hdf5 file"):
        mopo.load_dataset(bad, 11, 3)
    with pytest.raises(FileNotFoundError, match="--dataset-path"):
        mopo.load_dataset(tmp_path / "nope.hdf5", 11, 3)


def test_nan_in_data_is_a_clear_error(tmp_path, hopper_file):
    path = tmp_path / "nan.hdf5"
    path.write_bytes(hopper_file.read_bytes())
    with h5py.File(path, "r+") as f:
        f["rewards"][5] = np.nan
    with pytest.raises(ValueError, match="rewards holds NaN or inf"):
        mopo.load_dataset(path, 11, 3)


def test_rewards_and_terminals_as_columns_are_accepted(hopper_file, tmp_path):
    path = tmp_path / "columns.hdf5"
    with h5py.File(hopper_file) as src, h5py.File(path, "w") as dst:
        for k in src:
            dst.create_dataset(k, data=src[k][()][:, None] if k in ("rewards", "terminals") else src[k][()])
    data = mopo.load_dataset(path, 11, 3)
    assert data["rewards"].shape == data["terminals"].shape == (2000,)
