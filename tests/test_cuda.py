"""CUDA: the SAC update, the dynamics step and the gauge's step replayed as CUDA graphs do the eager math; a captured
sampler reaches rows added after the capture; mopo.main trains, stops on SIGTERM and resumes on a GPU, with and
without graphs; spectral normalization holds there too. Every test is skipped without a GPU."""
import copy
import json
import math
import os
import signal
import types
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

import mopo
from test_dynamics import known_system

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
CUDA = torch.device("cuda")
OBS, ACT = 3, 1
WIDTH = 2 * OBS + ACT + 2
ACTIONS = gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32)


# --- a. the SAC update: graph replay = eager ---
def random_rows(n, generator):
    obs, next_obs = torch.randn(n, OBS, generator=generator), torch.randn(n, OBS, generator=generator)
    act, rew = torch.rand(n, ACT, generator=generator) * 2 - 1, torch.randn(n, generator=generator)
    return mopo.to_rows(obs, act, rew, next_obs, torch.rand(n, generator=generator) < 0.2).to(CUDA)


def sac_updates(sac, opts, real, model, args, graph, n=10, seed=1):
    """n SAC updates as main runs them, from `seed`: batch indices and actor noise from the global generator."""
    def update():
        return mopo.sac_update(sac, opts, real.split(mopo.sample_mixed(real, model, args.batch_size, args.real_ratio)),
                               args)
    step = mopo.cuda_graph(update) if graph else update
    torch.manual_seed(seed)
    return [{k: float(v) for k, v in step().items()} for _ in range(n)]  # read before the next replay


def test_sac_update_replayed_as_a_graph_equals_eager_updates():
    """Seeded alike, 10 updates through `cuda_graph` (3 eager warm-ups on a side stream, a capture, replays) with
    capturable Adams draw the batch indices and the actor's noise that 10 eager updates draw (a replay advances the
    generator's offset as the eager kernels did): the same losses step by step, and the same weights after."""
    args = mopo.Args(batch_size=256, real_ratio=0.05)  # 12 real rows and 244 model rows per batch
    g = torch.Generator().manual_seed(0)
    real, model = mopo.ReplayBuffer(500, OBS, ACT, CUDA), mopo.ReplayBuffer(2000, OBS, ACT, CUDA)
    real.add(random_rows(500, g))
    model.add(random_rows(1500, g))  # not full: the sampler must read the fill level
    setups = []
    for capturable in (False, True, False):
        torch.manual_seed(0)
        sac = mopo.SAC(OBS, ACT, ACTIONS, args.alpha).to(CUDA)
        setups.append((sac, mopo.sac_optimizers(sac, args, CUDA, capturable)))
    (eager, eager_opts), (graphed, graphed_opts), (third, third_opts) = setups
    assert all(g["capturable"] for opt in graphed_opts.values() for g in opt.param_groups)
    start = [p.detach().clone() for p in graphed.actor.parameters()]
    want = sac_updates(eager, eager_opts, real, model, args, graph=False)
    got = sac_updates(graphed, graphed_opts, real, model, args, graph=True)
    for step, (w, o) in enumerate(zip(want, got)):
        assert o.keys() == w.keys()
        for k in w:
            assert o[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (step, k, o[k], w[k])
    for (name, p), q in zip(eager.state_dict().items(), graphed.state_dict().values()):  # weights, targets, log α
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(graphed.actor.parameters(), start))  # it trained
    other = sac_updates(third, third_opts, real, model, args, graph=False, n=1, seed=2)[0]
    assert other["losses/q_loss"] != want[0]["losses/q_loss"]  # the same start, other draws: equal was no accident


# --- b. a captured sampler and a growing buffer ---
def test_captured_sampler_reaches_rows_added_after_the_capture():
    buf = mopo.ReplayBuffer(2000, OBS, ACT, CUDA)

    def add(first, last):  # rows hold their own index in column 0
        buf.add(torch.arange(float(first), float(last), device=CUDA)[:, None].repeat(1, WIDTH))

    def draws(sample, times=5):
        return torch.cat([sample()["ids"].clone() for _ in range(times)])  # clone: the next replay overwrites

    add(0, 1000)
    sample = mopo.cuda_graph(lambda: {"ids": buf.sample(4096)[:, 0].long()})
    warm = draws(sample, 4)  # 3 eager warm-ups, then the capture and its first replay
    assert warm.min() >= 0 and warm.max() < 1000
    a, b = sample()["ids"].clone(), sample()["ids"].clone()
    assert not torch.equal(a, b)  # each replay draws new indices
    seen = draws(sample)
    assert seen.min() >= 0 and seen.max() < 1000
    add(1000, 2000)  # in place, into the rows the graph reads; count 1000 → 2000
    seen = draws(sample)
    assert seen.max() < 2000 and 0.45 < (seen >= 1000).float().mean().item() < 0.55
    add(2000, 2500)  # full: FIFO, rows 0..499 now hold 2000..2499
    seen = draws(sample)
    assert seen.min() >= 500 and seen.max() < 2500 and 0.2 < (seen >= 2000).float().mean().item() < 0.3


# --- c. mopo.main on a GPU ---
def cuda_args(dataset, **overrides):
    return mopo.Args(**{**dict(env_id="hopper-medium-v2", dataset_path=str(dataset), lam=1.0, epochs=2,
                               steps_per_epoch=60, rollout_freq=30, rollout_batch_size=200, eval_episodes=2,
                               dynamics_max_epochs=2, batch_size=64, log_freq=10, checkpoint_freq=1, eval_freq=1,
                               device="cuda"),
                        **overrides})


def check_finished(results, run_dir):
    assert [e["step"] for e in results["evaluations"]] == [60, 120]
    assert all(math.isfinite(v) for e in results["evaluations"] for v in e.values())
    assert math.isfinite(results["final_normalized_score"])
    assert results == json.loads((run_dir / "results.json").read_text())
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_main_on_cuda_with_graphs_trains_the_policy(hopper_file, tmp_path, monkeypatch):
    made, graphs = {}, []
    sac_optimizers, cuda_graph = mopo.sac_optimizers, mopo.cuda_graph

    def sac_optimizers_spy(sac, args, device, capturable):
        made.update(capturable=capturable, actor=sac.actor, start=[p.detach().clone() for p in sac.actor.parameters()])
        return sac_optimizers(sac, args, device, capturable)

    def cuda_graph_spy(fn):
        call, record = cuda_graph(fn), {"calls": 0}
        graphs.append(record)

        def counted():
            out = call()
            record["calls"] += 1
            if record["calls"] == 5 and isinstance(out, dict):  # the SAC update, replayed once already
                record["after_capture"] = [p.detach().clone() for p in made["actor"].parameters()]
            return out
        return counted
    monkeypatch.setattr(mopo, "sac_optimizers", sac_optimizers_spy)
    monkeypatch.setattr(mopo, "cuda_graph", cuda_graph_spy)
    monkeypatch.chdir(tmp_path)
    results = mopo.main(cuda_args(hopper_file))
    run_dir = next((tmp_path / "runs").iterdir())
    ckpt = check_finished(results, run_dir)
    assert made["capturable"] is True
    sac_graph = [g for g in graphs if "after_capture" in g]
    assert len(sac_graph) == 1 and sac_graph[0]["calls"] == 120  # one graph for the whole policy phase
    # and one for the dynamics step (2 epochs), one per evaluation for the gauge's model step (1,000 replays each)
    assert len(graphs) == 4 and all(g["calls"] > 4 for g in graphs) and [g["calls"] for g in graphs[2:]] == [1000] * 2
    names = [name for name, _ in made["actor"].named_parameters()]
    final = [p.detach().cpu() for p in made["actor"].parameters()]
    assert all(torch.equal(ckpt["sac"][f"actor.{name}"], p) for name, p in zip(names, final))  # the last checkpoint
    # the replays train: the actor moved after the capture, not only in the 3 eager warm-ups
    assert any(not torch.equal(p, p5.cpu()) for p, p5 in zip(final, sac_graph[0]["after_capture"]))
    assert any(not torch.equal(p, p0.cpu()) for p, p0 in zip(final, made["start"]))
    q_loss = scalars(run_dir, "losses/q_loss")
    assert len(q_loss) >= 12 and len(set(q_loss)) > len(q_loss) // 2  # the logged losses change between logs


def test_main_on_cuda_stops_on_sigterm_and_resumes(hopper_file, tmp_path, monkeypatch, capsys):
    rollout, calls, before = mopo.rollout, [], signal.getsignal(signal.SIGTERM)

    def rollout_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # before update 31: the run checkpoints there and exits 143
            assert signal.getsignal(signal.SIGTERM) is not before  # main's handler, never pytest's own
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(*args, **kwargs)
    monkeypatch.setattr(mopo, "rollout", rollout_then_sigterm)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        mopo.main(cuda_args(hopper_file))
    assert stopped.value.code == 143
    run_dir = next((tmp_path / "runs").iterdir())
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (ckpt["phase"], ckpt["step"]) == ("policy", 31) and ckpt["rng"]["cuda"]
    assert "SIGTERM: checkpoint at update 31" in capsys.readouterr().out
    monkeypatch.setattr(mopo, "rollout", rollout)
    results = mopo.main(mopo.Args(resume=str(run_dir)))
    assert "resumed" in capsys.readouterr().out
    assert check_finished(results, run_dir)["step"] == 120


def test_main_on_cuda_without_graphs(hopper_file, tmp_path, monkeypatch):
    def no_graph(fn):
        raise AssertionError("--no-cuda-graph must not record a graph")
    monkeypatch.setattr(mopo, "cuda_graph", no_graph)
    made, sac_optimizers = {}, mopo.sac_optimizers

    def sac_optimizers_spy(sac, args, device, capturable):
        made["capturable"] = capturable
        return sac_optimizers(sac, args, device, capturable)
    monkeypatch.setattr(mopo, "sac_optimizers", sac_optimizers_spy)
    monkeypatch.chdir(tmp_path)
    results = mopo.main(cuda_args(hopper_file, cuda_graph=False))
    check_finished(results, next((tmp_path / "runs").iterdir()))
    assert made["capturable"] is False


# --- c2. the gauge's model step: graph = eager ---
def test_gauge_replayed_as_a_graph_equals_eager():
    """Seeded alike, the recorded step draws the random numbers the eager one draws (graph-safe RNG); episodes that
    ended earn nothing however long the graph keeps stepping them."""
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(OBS, ACT, num_ensemble=4, num_elites=2, hidden_dim=32).to(CUDA)
    actor = mopo.Actor(OBS, ACT, -np.ones(ACT), np.ones(ACT)).to(CUDA)
    start = torch.randn(10, OBS, device=CUDA)
    done = lambda obs, act, next_obs: next_obs[:, 0].abs() > 3  # noqa: E731 - a random walk: some end early
    step = partial(mopo.model_step, model, penalty_kind="aleatoric", termination_fn=done)

    def gauge(seed, graph):
        with torch.random.fork_rng(devices=[CUDA]):
            torch.manual_seed(seed)
            return mopo.model_returns(actor, step, start, 300, 1.0, graph=graph)
    eager, graphed = gauge(7, graph=False), gauge(7, graph=True)
    assert eager["model_length"].min() < eager["model_length"].max()  # episodes of different lengths
    for k in eager:
        assert graphed[k].is_cuda
        torch.testing.assert_close(graphed[k], eager[k], msg=k)
    assert not torch.equal(gauge(8, graph=True)["model_return"], graphed["model_return"])  # the seed matters


def test_evaluation_with_the_gauge_on_cuda_leaves_training_rng_as_it_was():
    torch.manual_seed(0)
    task = mopo.make_task("hopper-medium-v2")
    envs = gym.vector.SyncVectorEnv([lambda: mopo.make_env(task)] * 2)
    model = mopo.EnsembleDynamics(11, 3, num_ensemble=4, num_elites=2, hidden_dim=32).to(CUDA)
    actor = mopo.Actor(11, 3, envs.single_action_space.low, envs.single_action_space.high)
    step = partial(mopo.model_step, model, penalty_kind="aleatoric", termination_fn=mopo.hopper_done)
    cuda_actor = copy.deepcopy(actor).to(CUDA)
    gauge = lambda s: mopo.model_returns(cuda_actor, step, s.to(CUDA), 1000, 1.0, True)  # noqa: E731 - as main's
    before = torch.cuda.get_rng_state(), torch.get_rng_state()
    out = mopo.evaluate(actor, envs, 3, gauge)
    assert torch.equal(torch.cuda.get_rng_state(), before[0]) and torch.equal(torch.get_rng_state(), before[1])
    assert out["model_return"].shape == (2,) and torch.isfinite(torch.as_tensor(out["model_return"])).all()


# --- d. the dynamics step: graph = eager ---
def train_on_cuda(graph, epochs, spectral_norm=False):
    obs, act, target = (x.to(CUDA) for x in known_system(1500))
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=4, num_elites=2, hidden_dim=32,
                                  spectral_norm=spectral_norm).to(CUDA)
    args = types.SimpleNamespace(num_ensemble=4, num_elites=2, holdout_size=300, dynamics_lr=3e-3,
                                 dynamics_batch_size=64, dynamics_max_epochs=epochs, cuda_graph=graph)
    return model, mopo.train_dynamics(model, (obs, act, target), args), target.var(0).mean().item()


def test_dynamics_training_as_a_graph_equals_eager(monkeypatch):
    """1,200 training rows, minibatches of 64: 18 full ones per epoch replayed (after 3 warm-ups and a capture), the
    last 48-row one eager. Same data order (same seed), same math: the same ensemble to float noise."""
    recorded = []
    cuda_graph = mopo.cuda_graph
    monkeypatch.setattr(mopo, "cuda_graph", lambda fn: recorded.append(fn) or cuda_graph(fn))
    eager, eager_stats, _ = train_on_cuda(graph=False, epochs=2)
    assert recorded == []
    graphed, graph_stats, _ = train_on_cuda(graph=True, epochs=2)
    assert len(recorded) == 1
    assert graph_stats["epochs"] == eager_stats["epochs"] == 2
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3, msg=name)
    assert graph_stats["holdout_mse"] == pytest.approx(eager_stats["holdout_mse"], rel=1e-3)


def test_dynamics_training_as_a_graph_learns():
    results = {graph: train_on_cuda(graph, epochs=30) for graph in (False, True)}
    for graph, (model, stats, variance) in results.items():
        assert stats["holdout_mse"] < 0.3 * variance, (graph, stats, variance)
    assert results[True][1]["holdout_mse"] == pytest.approx(results[False][1]["holdout_mse"], rel=0.25)


# --- e. spectral normalization on a GPU (with the dynamics graph) ---
def test_spectral_norm_bound_on_cuda():
    model, stats, variance = train_on_cuda(graph=True, epochs=15, spectral_norm=True)
    for layer in [*model.hidden, model.mean_head]:
        raw = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        normalized = torch.linalg.matrix_norm(layer.normalized_weight().detach(), ord=2)
        assert (normalized <= 1 + 1e-3).all() and (normalized >= 0.99).all(), normalized
        assert ((raw - 1).abs() > 0.05).any()  # normalization did something
    assert stats["holdout_mse"] < variance


def test_model_training_resumes_on_cuda_from_a_cpu_loaded_checkpoint():
    """A checkpoint is read with map_location="cpu": its training state must come back to the GPU."""
    obs, act, target = (x.to(CUDA) for x in known_system(1500))
    args = types.SimpleNamespace(num_ensemble=4, num_elites=2, holdout_size=300, dynamics_lr=3e-3,
                                 dynamics_batch_size=64, dynamics_max_epochs=3, cuda_graph=True)
    saved = {}

    def save(state):
        saved.update(state=torch.load(io_roundtrip(state), map_location="cpu", weights_only=False))
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=4, num_elites=2, hidden_dim=32).to(CUDA)
    args.dynamics_max_epochs = 2
    mopo.train_dynamics(model, (obs, act, target), args, on_epoch=save)  # saves after epoch 1
    args.dynamics_max_epochs = 3
    stats = mopo.train_dynamics(model, (obs, act, target), args, state=saved["state"])
    assert stats["epochs"] == 3 and math.isfinite(stats["holdout_mse"])


def io_roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
