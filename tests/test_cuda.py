"""CUDA (issue 11): the SAC update and the dynamics step replayed as CUDA graphs do the eager math; a captured sampler
reaches rows added after the capture; mopo.main trains, stops on SIGTERM and resumes on a GPU, with and without
graphs; spectral normalization holds there too. Every test is skipped without a GPU."""
import json
import math
import os
import signal
import types

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
SPACES = types.SimpleNamespace(observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS,), np.float32),
                               action_space=gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32))


def one_row(seed):
    g = torch.Generator().manual_seed(seed)
    obs, next_obs, act = torch.randn(1, OBS, generator=g), torch.randn(1, OBS, generator=g), torch.rand(1, ACT) * 2 - 1
    return mopo.to_rows(obs, act, torch.randn(1, generator=g), next_obs, torch.zeros(1)).to(CUDA)


# --- a. the SAC update: graph replay = eager ---
def random_rows(n, generator):
    obs, next_obs = torch.randn(n, OBS, generator=generator), torch.randn(n, OBS, generator=generator)
    act, rew = torch.rand(n, ACT, generator=generator) * 2 - 1, torch.randn(n, generator=generator)
    return mopo.to_rows(obs, act, rew, next_obs, torch.rand(n, generator=generator) < 0.2).to(CUDA)


def sac_updates(sac, real, model, args, graph, n=10):
    """n SAC updates as main runs them, from seed 1: batch indices and actor noise drawn from the global generator."""
    def update():
        return mopo.sac_update(real.split(mopo.sample_mixed(real, model, args.batch_size, args.real_ratio)), *sac,
                               args)
    step = mopo.cuda_graph(update) if graph else update
    torch.manual_seed(1)
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
    for capturable in (False, True):
        torch.manual_seed(0)
        setups.append(mopo.make_sac(SPACES, args, CUDA, capturable))
    eager, graphed = setups
    assert all(g["capturable"] for opt in graphed[4:] for g in opt.param_groups)
    start = [p.detach().clone() for p in graphed[0].parameters()]
    want, got = sac_updates(eager, real, model, args, graph=False), sac_updates(graphed, real, model, args, graph=True)
    for step, (w, o) in enumerate(zip(want, got)):
        assert o.keys() == w.keys()
        for k in w:
            assert o[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (step, k, o[k], w[k])
    for a, b, name in zip(eager[:3], graphed[:3], ("actor", "qf", "qf_target")):
        for (pname, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=f"{name}.{pname}")
    torch.testing.assert_close(graphed[3], eager[3], atol=1e-6, rtol=1e-5)  # log α
    assert any(not torch.equal(p, p0) for p, p0 in zip(graphed[0].parameters(), start))  # it trained
    torch.manual_seed(2)
    other = sac_updates(setups[0], real, model, args, graph=False, n=1)[0]
    assert other["losses/q_loss"] != want[0]["losses/q_loss"]  # the draws matter: equal losses were no accident


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
                               dynamics_max_epochs=2, batch_size=64, log_freq=10, checkpoint_freq=1, device="cuda"),
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
    make_sac, cuda_graph = mopo.make_sac, mopo.cuda_graph

    def make_sac_spy(env, args, device, capturable):
        sac = make_sac(env, args, device, capturable)
        made.update(capturable=capturable, actor=sac[0], start=[p.detach().clone() for p in sac[0].parameters()])
        return sac

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
    monkeypatch.setattr(mopo, "make_sac", make_sac_spy)
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
    assert all(torch.equal(ckpt["actor"][name], p) for name, p in zip(names, final))  # the last checkpoint has it
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
    made, make_sac = {}, mopo.make_sac

    def make_sac_spy(env, args, device, capturable):
        made["capturable"] = capturable
        return make_sac(env, args, device, capturable)
    monkeypatch.setattr(mopo, "make_sac", make_sac_spy)
    monkeypatch.chdir(tmp_path)
    results = mopo.main(cuda_args(hopper_file, cuda_graph=False))
    check_finished(results, next((tmp_path / "runs").iterdir()))
    assert made["capturable"] is False


# --- c2. the gauge's model step: graph = eager ---
def test_gauge_replayed_as_a_graph_equals_eager_and_restores_training_rng():
    """Seeded alike, the recorded step draws the random numbers the eager one draws (graph-safe RNG); episodes that
    ended earn nothing however long the graph keeps stepping them; training's generator is as it was."""
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(OBS, ACT, num_ensemble=4, num_elites=2, hidden_dim=32).to(CUDA)
    actor = mopo.Actor(OBS, ACT, -np.ones(ACT), np.ones(ACT)).to(CUDA)
    start = torch.randn(10, OBS, device=CUDA)
    done = lambda obs, act, next_obs: next_obs[:, 0].abs() > 3  # noqa: E731 - a random walk: some end early
    before = torch.cuda.get_rng_state()
    eager = mopo.model_returns(actor, model, start, 300, 1.0, "aleatoric", done, seed=7)
    graphed = mopo.model_returns(actor, model, start, 300, 1.0, "aleatoric", done, seed=7, graph=True)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert eager["model_length"].min() < eager["model_length"].max()  # episodes of different lengths
    for k in eager:
        assert graphed[k].is_cuda
        torch.testing.assert_close(graphed[k], eager[k], msg=k)
    other = mopo.model_returns(actor, model, start, 300, 1.0, "aleatoric", done, seed=8, graph=True)
    assert not torch.equal(other["model_return"], graphed["model_return"])  # the seed matters


# --- d. the dynamics step: graph = eager ---
def train_on_cuda(graph, epochs, spectral_norm=False):
    obs, act, target = (x.to(CUDA) for x in known_system(1500))
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=4, num_elites=2, hidden_dim=32,
                                  spectral_norm=spectral_norm).to(CUDA)
    args = types.SimpleNamespace(num_ensemble=4, num_elites=2, holdout_size=300, dynamics_lr=3e-3,
                                 dynamics_batch_size=64, dynamics_max_epochs=epochs, cuda_graph=graph)
    return model, mopo.train_dynamics(model, obs, act, target, args), target.var(0).mean().item()


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

    def save(state, stop):
        saved.update(state=torch.load(io_roundtrip(state), map_location="cpu", weights_only=False))
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=4, num_elites=2, hidden_dim=32).to(CUDA)
    args.dynamics_max_epochs = 2
    mopo.train_dynamics(model, obs, act, target, args, save=save)  # saves after epoch 1
    args.dynamics_max_epochs = 3
    stats = mopo.train_dynamics(model, obs, act, target, args, state=saved["state"])
    assert stats["epochs"] == 3 and math.isfinite(stats["holdout_mse"])


def io_roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
