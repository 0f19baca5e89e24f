"""benchmarks/learns.py: the halfcheetah-random dataset follows D4RL's recipe (the benchmark itself is not a test)."""
import h5py
import numpy as np
import pytest

import learns
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
