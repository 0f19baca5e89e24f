"""Write an offline dataset in D4RL's hdf5 layout from a gymnasium MuJoCo env, without any download.

    python benchmarks/make_dataset.py random --env-id Hopper-v4 --num-steps 100000 --out hopper_random.hdf5
    python benchmarks/make_dataset.py train-behaviour --env-id Hopper-v4 --target-return 1500 \
        --actor benchmarks/behaviour/hopper_medium_actor.pt --replay-out hopper_medium_replay.hdf5
    python benchmarks/make_dataset.py medium --actor benchmarks/behaviour/hopper_medium_actor.pt \
        --num-steps 200000 --out hopper_medium.hdf5

D4RL's recipes (Fu et al. 2020, Sec. 5), every file with 1,000-step episodes, `terminals` (the env's own termination)
and `timeouts` (the time limit) recorded separately, `next_observations` stored explicitly:
- random: uniformly random actions.
- medium: a policy trained online with SAC and stopped early, at about a third of an expert's return; the data is
  that policy's *stochastic* actions. `train-behaviour` trains it with mopo.py's own `SAC` and `sac_update` and stops
  at the first deterministic evaluation whose mean return reaches `--target-return`; the actor is saved (small, with
  its env, step count and evaluation return beside it), so `medium` regenerates the data from it in minutes.
- medium-replay: that training's whole replay buffer up to the stopping step (`--replay-out` of `train-behaviour`).
"""

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mopo  # noqa: E402

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


@dataclass
class Recording:
    num_steps: int = 100_000
    """transitions to record"""
    out: str = "dataset.hdf5"
    """output hdf5 path"""
    seed: int = 0
    """seed of env and actions"""


@dataclass
class Random(Recording):
    """D4RL's random recipe."""
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    max_episode_steps: int = 1000
    """episode cap (D4RL: 1000)"""


@dataclass
class TrainBehaviour:
    """Online SAC until a deterministic evaluation reaches --target-return; saves the actor and the replay buffer."""
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    target_return: float = 1500.0
    """stop at the first evaluation whose mean return reaches this (D4RL's medium level: see benchmarks/README.md)"""
    actor: str = "actor.pt"
    """where the actor goes (its state_dict and how it was made)"""
    replay_out: str = ""
    """if set, the replay buffer up to the stopping step goes here (medium-replay)"""
    max_steps: int = 1_000_000
    """give up (an error) after this many env steps"""
    warmup_steps: int = 5000
    """uniformly random actions before the first update"""
    eval_every: int = 5000
    """env steps between evaluations"""
    eval_episodes: int = 5
    """deterministic episodes per evaluation"""
    seed: int = 0
    """seed of env, actions and networks"""


@dataclass
class Medium(Recording):
    """D4RL's medium recipe from a saved actor: its stochastic actions."""
    actor: str = "actor.pt"
    """an actor written by train-behaviour"""
    num_steps: int = 200_000
    """transitions to record"""


def make_env(env_id: str, max_episode_steps: int = 1000, **gym_kwargs) -> gym.Env:
    return mopo.make_env(mopo.Task(env_id, "", None, env_id, {"max_episode_steps": max_episode_steps, **gym_kwargs}))


def keep(data: dict, obs, act, rew, next_obs, terminated, truncated) -> None:
    """One transition under D4RL's keys: a time limit is a timeout, not a terminal."""
    for k, v in zip(KEYS, (obs, act, rew, next_obs, terminated, truncated and not terminated)):
        data[k].append(v)


def record(env: gym.Env, policy, num_steps: int, seed: int) -> tuple[dict, np.ndarray]:
    """num_steps transitions of policy(obs) → action, D4RL's keys; and the completed episodes' returns."""
    data = {k: [] for k in KEYS}
    returns, episode_return = [], 0.0
    obs, _ = env.reset(seed=seed)
    for _ in range(num_steps):
        act = policy(obs)
        next_obs, rew, terminated, truncated, _ = env.step(act)
        keep(data, obs, act, rew, next_obs, terminated, truncated)
        episode_return += rew
        if terminated or truncated:
            returns.append(episode_return)
            episode_return, obs = 0.0, env.reset()[0]
        else:
            obs = next_obs
    return data, np.asarray(returns)


def write(path, data: dict) -> None:
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32))


def make_dataset(path, env_id="Hopper-v4", num_steps=100_000, max_episode_steps=1000, seed=0, **gym_kwargs):
    """The random recipe: uniformly random actions; returns the completed episodes' returns."""
    env = make_env(env_id, max_episode_steps, **gym_kwargs)
    env.action_space.seed(seed)
    data, returns = record(env, lambda obs: env.action_space.sample(), num_steps, seed)
    env.close()
    write(path, data)
    return returns


def train_behaviour(env_id: str, target_return: float, actor_path, replay_out=None, max_steps=1_000_000,
                    warmup_steps=5000, eval_every=5000, eval_episodes=5, seed=0) -> dict:
    """Online SAC (mopo.py's networks, losses and hyperparameters; target entropy −dim(A), the usual online setting)
    with one update per env step after `warmup_steps` random ones; evaluates every `eval_every` steps and stops at the
    first mean return ≥ target_return. Saves the actor; returns how it was made."""
    torch.manual_seed(seed)
    env = make_env(env_id)
    env.action_space.seed(seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    args = replace(mopo.Args(), target_entropy=-float(act_dim))
    sac = mopo.SAC(obs_dim, act_dim, env.action_space, args.alpha)
    opts = mopo.sac_optimizers(sac, args, torch.device("cpu"), capturable=False)
    buffer = mopo.ReplayBuffer(max_steps, obs_dim, act_dim, torch.device("cpu"))
    envs = gym.vector.SyncVectorEnv([lambda: make_env(env_id)] * eval_episodes)
    data, evaluations, start = {k: [] for k in KEYS}, [], time.time()
    obs, _ = env.reset(seed=seed)
    for t in range(1, max_steps + 1):
        with torch.no_grad():
            act = env.action_space.sample() if t <= warmup_steps else \
                sac.actor.sample(torch.as_tensor(obs, dtype=torch.float32)[None])[0][0].numpy()
        next_obs, rew, terminated, truncated, _ = env.step(act)
        keep(data, obs, act, rew, next_obs, terminated, truncated)
        buffer.add(mopo.to_rows(*(torch.as_tensor(np.asarray([v]), dtype=torch.float32)
                                  for v in (obs, act, rew, next_obs, terminated))))
        obs = env.reset()[0] if terminated or truncated else next_obs
        if t > warmup_steps:
            mopo.sac_update(sac, opts, buffer.split(buffer.sample(args.batch_size)), args)
        if t % eval_every == 0:
            returns = mopo.evaluate(sac.actor, envs, seed=10_000 + t)["return"]
            evaluations.append({"step": t, "return": float(returns.mean()), "return_std": float(returns.std()),
                                "wall_s": round(time.time() - start, 1)})
            print(f"{env_id} step {t}: return {returns.mean():.1f} ± {returns.std():.1f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            if returns.mean() >= target_return:
                break
    else:
        raise RuntimeError(f"{env_id}: no evaluation reached {target_return} in {max_steps} steps")
    info = {"env_id": env_id, "steps": t, "eval_return": evaluations[-1]["return"],
            "eval_return_std": evaluations[-1]["return_std"], "target_return": target_return,
            "eval_episodes": eval_episodes, "warmup_steps": warmup_steps, "seed": seed,
            "target_entropy": args.target_entropy, "evaluations": evaluations}
    Path(actor_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"actor": sac.actor.state_dict(), "info": info}, actor_path)
    if replay_out:
        write(replay_out, data)
    return info


def load_actor(path) -> tuple[mopo.Actor, dict]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    env = make_env(saved["info"]["env_id"])
    actor = mopo.Actor(env.observation_space.shape[0], env.action_space.shape[0], env.action_space.low,
                       env.action_space.high)
    actor.load_state_dict(saved["actor"])
    env.close()
    return actor, saved["info"]


def make_medium(path, actor_path, num_steps=200_000, seed=0) -> np.ndarray:
    """The medium recipe: the saved actor's stochastic actions, seeded; returns the completed episodes' returns."""
    actor, info = load_actor(actor_path)
    env = make_env(info["env_id"])
    torch.manual_seed(seed)

    @torch.no_grad()
    def policy(obs):
        return actor.sample(torch.as_tensor(obs, dtype=torch.float32)[None])[0][0].numpy()
    data, returns = record(env, policy, num_steps, seed)
    env.close()
    write(path, data)
    return returns


if __name__ == "__main__":
    args = tyro.extras.subcommand_cli_from_dict({"random": Random, "train-behaviour": TrainBehaviour,
                                                  "medium": Medium})
    if isinstance(args, TrainBehaviour):
        info = train_behaviour(args.env_id, args.target_return, args.actor, args.replay_out, args.max_steps,
                               args.warmup_steps, args.eval_every, args.eval_episodes, args.seed)
        print(f"{args.actor}: {info['env_id']} after {info['steps']} steps, evaluation return "
              f"{info['eval_return']:.1f}")
    else:
        returns = make_dataset(args.out, args.env_id, args.num_steps, args.max_episode_steps, args.seed) \
            if isinstance(args, Random) else make_medium(args.out, args.actor, args.num_steps, args.seed)
        print(f"{args.out}: {args.num_steps} transitions, {len(returns)} complete episodes, "
              f"return {returns.mean():.1f} ± {returns.std():.1f}")
