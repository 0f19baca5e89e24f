"""The paper's out-of-distribution tasks (Sec. 5.2, Table 2): halfcheetah-jump and ant-angle.

The data is the whole replay buffer of a SAC agent trained on the ordinary task (D4RL's `*-full-replay-v2`) with every
reward relabelled; the policy is evaluated in the ordinary env paying the new reward. This file writes the relabelled
dataset and registers the evaluation envs with gymnasium, so mopo.py runs them through gymnasium's `module:EnvId` form
(the module is imported again on --resume):

    python benchmarks/ood_tasks.py halfcheetah-jump   # writes halfcheetah_jump.hdf5 (downloads the replay data)
    python mopo.py --env-id benchmarks.ood_tasks:HalfCheetah-jump-v0 --dataset-path halfcheetah_jump.hdf5 --lam 0.5

Both rewards are computed from (s, a, s') with the observation layout of D4RL's files; results are raw returns.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import h5py
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def halfcheetah_jump_reward(obs, act, next_obs):
    """r = min(v_x, 3) − 0.1‖a‖² + 15·(z − z_init). HalfCheetah observes [qpos[1:] (8), qvel (9)]: z = qpos[1] =
    s'[0], whose initial value init_qpos[1] is 0, and v_x = qvel[0] = s'[8] after the step (the env's own Δx/dt
    needs x, which the observation lacks)."""
    return np.minimum(next_obs[:, 8], 3.0) - 0.1 * np.square(act).sum(1) + 15.0 * next_obs[:, 0]


def ant_angle_reward(obs, act, next_obs):
    """r = v_xy·(cos 30°, sin 30°) − 0.5‖a‖² − 5e-4‖clip(contact forces)‖² + 1. Ant observes [qpos[2:] (13),
    qvel (14), contact forces clipped to ±1 (84)]: v_xy = qvel[:2] = s'[13:15] after the step. The contact term is
    0 here, as in the paper's data: D4RL's ant (and mopo.py's evaluation env, D14) observes zero contact forces."""
    direction = np.array([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    return (next_obs[:, 13:15] @ direction - 0.5 * np.square(act).sum(1) - 5e-4 * np.square(next_obs[:, 27:]).sum(1)
            + 1.0)


# task: (D4RL family whose full-replay data it relabels, reward, registered evaluation env)
TASKS = {"halfcheetah-jump": ("halfcheetah", halfcheetah_jump_reward, "HalfCheetah-jump-v0"),
         "ant-angle": ("ant", ant_angle_reward, "Ant-angle-v0")}


class RelabelledReward(gym.Wrapper):
    """The D4RL task's evaluation env (ant: contact forces zeroed, as in D4RL's data), paying reward(s, a, s')."""

    def __init__(self, family: str, reward):
        import mopo

        super().__init__(mopo.make_env(mopo.make_task(f"{family}-full-replay-v2")))
        self.reward_fn, self.obs = reward, None

    def reset(self, **kwargs):
        self.obs, info = self.env.reset(**kwargs)
        return self.obs, info

    def step(self, action):
        next_obs, _, terminated, truncated, info = self.env.step(action)
        reward = float(self.reward_fn(self.obs[None], np.asarray(action)[None], next_obs[None])[0])
        self.obs = next_obs
        return next_obs, reward, terminated, truncated, info


for _family, _reward, _env_id in TASKS.values():
    if _env_id not in gym.registry:  # imported as ood_tasks and as benchmarks.ood_tasks alike
        gym.register(_env_id, entry_point=RelabelledReward, max_episode_steps=1000,
                     kwargs={"family": _family, "reward": _reward})


def relabel(task: str, full_replay: Optional[str], out: str) -> dict:
    """Write `out` in D4RL layout: the full-replay data (`full_replay`, else D4RL's file from its cache, downloaded if
    missing) with every reward relabelled. Returns the data written."""
    import mopo

    family, reward, env_id = TASKS[task]
    env = gym.make(env_id)
    data = mopo.get_dataset(mopo.make_task(f"{family}-full-replay-v2"), full_replay, env.observation_space.shape[0],
                            env.action_space.shape[0])
    data["rewards"] = reward(data["observations"], data["actions"], data["next_observations"]).astype(np.float32)
    with h5py.File(out, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
    return data


@dataclass
class Args:
    task: tyro.conf.Positional[Literal["halfcheetah-jump", "ant-angle"]]
    """the out-of-distribution task"""
    full_replay: Optional[str] = None
    """the full-replay file in D4RL layout (default: D4RL's, from its cache or downloaded)"""
    out: Optional[str] = None
    """where to write (default: halfcheetah_jump.hdf5 or ant_angle.hdf5 here)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    out = args.out or f"{args.task.replace('-', '_')}.hdf5"
    data = relabel(args.task, args.full_replay, out)
    print(f"{out}: {len(data['rewards'])} transitions, relabelled reward mean {data['rewards'].mean():.3f}; now\n"
          f"python mopo.py --env-id benchmarks.ood_tasks:{TASKS[args.task][2]} --dataset-path {out}")
