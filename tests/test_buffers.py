"""Real/model buffer mixing (D10) and the FIFO model buffer (D9)."""
import pytest
import torch

import mopo

OBS, ACT = 3, 2


def filled(capacity, value, n=None):
    buf = mopo.ReplayBuffer(capacity, OBS, ACT, torch.device("cpu"))
    buf.add(torch.full((capacity if n is None else n, 2 * OBS + ACT + 2), float(value)))
    return buf


@pytest.mark.parametrize("real_ratio, batch_size, n_real", [(0.0, 256, 0), (0.05, 256, 12), (0.5, 256, 128),
                                                            (0.5, 7, 3), (1.0, 256, 256), (0.999, 10, 9)])
def test_batch_composition(real_ratio, batch_size, n_real):
    real, model = filled(100, 1.0), filled(50, -1.0)
    batch = mopo.sample_mixed(real, model, batch_size, real_ratio)
    assert batch.shape == (batch_size, 2 * OBS + ACT + 2)
    from_real = (batch == 1.0).all(1)
    from_model = (batch == -1.0).all(1)
    assert int(from_real.sum()) == n_real == int(real_ratio * batch_size)
    assert int(from_model.sum()) == batch_size - n_real
    assert from_real[:n_real].all()  # real rows first, then model rows: one fused batch


def test_real_ratio_one_needs_no_model_data():
    real, empty_model = filled(10, 1.0), mopo.ReplayBuffer(10, OBS, ACT, torch.device("cpu"))
    assert (mopo.sample_mixed(real, empty_model, 32, 1.0) == 1.0).all()


def test_samples_cover_only_stored_rows():
    buf = mopo.ReplayBuffer(100, OBS, ACT, torch.device("cpu"))
    buf.add(torch.arange(30.0)[:, None].repeat(1, 2 * OBS + ACT + 2))
    ids = buf.sample(5000)[:, 0]
    assert set(ids.long().tolist()) == set(range(30))  # uniform over the 30 rows held, never the empty 70


def test_model_buffer_drops_oldest_rows_first():
    buf = mopo.ReplayBuffer(10, OBS, ACT, torch.device("cpu"))
    width = 2 * OBS + ACT + 2
    for round_id, n in enumerate([4, 4, 4, 3]):  # rollout rounds of different sizes (terminations shorten them)
        buf.add(torch.full((n, width), float(round_id)))
    held = sorted(buf.data[:, 0].tolist())
    # 15 rows went in, capacity 10: round 0 (4 rows) and the first row of round 1 were the oldest and are gone
    assert held == [1.0] * 3 + [2.0] * 4 + [3.0] * 3
    assert buf.size == 10 and buf.ptr == 5


def test_adding_more_than_capacity_keeps_the_newest():
    buf = mopo.ReplayBuffer(4, OBS, ACT, torch.device("cpu"))
    buf.add(torch.zeros(1, 2 * OBS + ACT + 2))
    buf.add(torch.arange(9.0)[:, None].repeat(1, 2 * OBS + ACT + 2))
    assert sorted(buf.data[:, 0].tolist()) == [5.0, 6.0, 7.0, 8.0]


def test_split_shapes():
    buf = filled(8, 0.5)
    obs, act, rew, next_obs, done = buf.split(buf.sample(6))
    assert obs.shape == next_obs.shape == (6, OBS) and act.shape == (6, ACT)
    assert rew.shape == done.shape == (6,)


def test_sampling_reads_the_fill_level_from_count_so_a_growing_buffer_needs_nothing_rebuilt():
    """What a CUDA graph captured once relies on: `sample` takes the fill level from the device tensor `count` at each
    call (not from a Python int frozen into the call), so the same call reaches rows added later, uniformly."""
    torch.manual_seed(0)
    width = 2 * OBS + ACT + 2
    buf = mopo.ReplayBuffer(1000, OBS, ACT, torch.device("cpu"))
    count = buf.count
    assert count.dtype == torch.long and count.item() == 0
    buf.add(torch.arange(300.0)[:, None].repeat(1, width))  # rows hold their own index
    assert buf.count is count and count.item() == buf.size == 300  # updated in place
    ids = buf.sample(30_000)[:, 0].long()
    assert ids.min() >= 0 and ids.max() < 300
    buf.add(torch.arange(300.0, 900.0)[:, None].repeat(1, width))
    assert buf.count is count and count.item() == 900
    ids = buf.sample(90_000)[:, 0].long()
    assert ids.max() < 900 and (ids >= 300).float().mean() > 0.6  # the new rows: 2/3 of the draws
    hist = torch.bincount(ids // 100, minlength=9).float()  # 9 bins of 100 rows, 10,000 draws expected in each
    chi2 = ((hist - 10_000) ** 2 / 10_000).sum().item()
    assert chi2 < 40, hist  # 8 degrees of freedom: P(χ² > 40) < 1e-5
    buf.add(torch.arange(900.0, 1200.0)[:, None].repeat(1, width))  # full: rows 900..999, then 1000..1199 wrap
    assert count.item() == 1000 and buf.ptr == 200
    ids = buf.sample(50_000)[:, 0].long()
    assert ids.min() >= 200 and ids.max() < 1200 and set(ids.tolist()) == set(range(200, 1200))
    # the fill level is the tensor's, not the Python int's: a sampler that reads `size` would still draw 1000 rows
    count.fill_(10)
    ids = buf.sample(5000)[:, 0].long()
    assert set(ids.tolist()) <= set(range(1000, 1010))  # rows 0..9 of data hold 1000..1009 after the wrap
