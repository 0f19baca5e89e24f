"""MOPO: Model-based Offline Policy Optimization, in one file.

Yu, Thomas, Yu, Ermon, Zou, Levine, Finn, Ma. NeurIPS 2020. arXiv:2005.13239 (v2). Equation and algorithm numbers
below refer to that version; "authors' code" is github.com/tianheyu927/mopo (TF1, built on MBPO/softlearning).

    python mopo.py --env-id hopper-medium-v2                       # the published (h, λ) for the task
    python mopo.py --env-id hopper-medium-v2 --lam 1.0 --rollout-length 5
    python mopo.py --env-id walker2d-medium-v2 --dataset-path my_walker.hdf5   # a local file in D4RL layout

Sections: 1 Args · 2 Data · 3 Termination functions · 4 Ensemble dynamics · 5 MOPO: penalty and rollouts ·
6 SAC · 7 Evaluation · 8 main.

Implementation details (every choice the paper leaves open; its source; where we depart from the authors, why):
D1  Model targets [reward, Δs = s' − s], reward first (authors' code; OfflineRL-Kit puts it last). Inputs [s, a]
    z-scored with the training split's mean/std (std < 1e-12 → 1), stored inside the model.
D2  Dynamics: 7 members, 4 hidden layers × 200 swish, a mean head and a separate log-variance head on the last
    hidden layer (authors' D4RL configs); weights truncated-normal with std 1/(2√fan_in), biases zero.
D3  Log-variance soft bounds: learnable max (init 0.5) and min (init −10) shared by the members,
    lv = max − softplus(max − lv), lv = min + softplus(lv − min), loss += 0.01·Σmax − 0.01·Σmin (authors').
D4  Model loss: per member, mean over batch and dims of (μ − y)²·e^{−lv} + lv, summed over members; L2 0.5·wd·Σw²
    with wd 2.5e-5, 5e-5, 7.5e-5, 7.5e-5 (hidden) and 1e-4 (heads), as Adam's coupled weight decay (same gradient).
D5  Model training: holdout min(20%, 1000) transitions; each member its own bootstrap of the rest; Adam 1e-3, batch
    256. A member is snapshotted when its holdout MSE improves by > 1%; stop once none improved for more than 5
    epochs, restore the snapshots (log-var bounds keep their last values, as the authors'). Elites: 5 lowest MSEs.
D6  Penalty (Alg. 2): u(s,a) = max over ALL members of ‖σ_i(s,a)‖₂, reward dim included (the paper writes ‖Σ_i‖_F;
    the authors' code uses the std). `--penalty ensemble-std`: max_i ‖μ_i − mean_j μ_j‖ over the Δs dims, the
    authors' disagreement alternative (OfflineRL-Kit's `pairwise-diff`, not its `ensemble_std`).
D7  Model step: per transition one random elite, (r, Δs) = μ + σ·ε; SAC sees the sampled r − λ·u (authors' code; the
    paper writes the mean r̂). Noise is drawn only for the chosen member.
D8  Rollouts: `rollout_batch_size` dataset states, the current stochastic policy, h steps, every `rollout_freq`
    updates (the first before the first update); a branch stops when the termination function fires (done = 1).
D9  Model buffer: FIFO of model_retain_epochs × rollout_batch_size × h rows; the authors size it per epoch, the same
    with the default schedule.
D10 Batch mixing: int(real_ratio·batch_size) real rows + model rows, one batch. real_ratio 0: model rows only (real
    data only seeds rollouts); 1: plain SAC on the dataset, no rollouts (the model is still trained and saved).
D11 Termination functions from MBPO/MOPO, tested against gymnasium's `terminated`; hopper's `abs()` bug (wrapping
    the whole `< 100` test) fixed. Hopper's env also ends on |qvel| > 100, which its clipped observation cannot show.
D12 Real data: `next_observations` from the file (d4rl's `qlearning_dataset` is wrong at episode ends); timeouts are
    not terminals; the whole dataset is kept (the authors' 1M-row pool drops half of medium-expert).
D13 SAC as softlearning: 2×256 ReLU actor and critics, tanh-Gaussian with log-std in (−20, 2), lr 3e-4, γ 0.99,
    τ 0.005, α from 1.0 tuned to target entropy −3 (authors', every task), min of twin critics in target and actor
    loss. Departures: critic, actor, α stepped in turn on one batch (CleanRL; the TF graph used pre-update values);
    PyTorch's default init (Keras: Glorot).
D14 Evaluation in gymnasium `-v4` MuJoCo envs (gym `-v2` on mujoco-py before): same models and observations; Ant with
    contact forces for D4RL's 111 dims, zeroed and left out of the reward as in D4RL's MuJoCo-2.0 data (D4RL #143).
    Deterministic actions; the normalized score per episode, then mean and std.
D15 Per-task (h, λ): OfflineRL-Kit's published -v2 settings; random from the authors' -v0 configs; the rest ours
    (TASK_DEFAULTS).
D16 `--spectral-norm` (off): the paper's appendix normalizes every model layer but the variance head; the authors'
    code never did (tianheyu927/mopo #3), nor the published numbers. Power iteration batched over members, one step
    per training forward; the final σ from an exact SVD, fixed from then on (rollouts and the gauge in eval mode).
D17 The gauge (Theorem 4.4, ours): each evaluation also runs the deterministic policy in the learned model from the
    evaluation's start states (D7's sampling, to termination or the env's horizon), logging Σr and Σ(r − λ·u).
D18 On CUDA, evaluation (ours) runs beside training: the episodes in a thread with a CPU copy of the actor taken at
    its update (Python's switch interval 0.1 ms meanwhile), the gauge on the GPU, a CUDA graph the GPU runs between
    updates; both are logged at the next evaluation or checkpoint. On the CPU all runs in turn.
"""

import copy
import http.client
import json
import math
import os
import random
import signal
import sys
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


# === 1. Args ===
@dataclass
class Args:
    # experiment
    exp_name: str = "mopo"
    """the name of this experiment (part of the run folder name)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, CUDA is used when available"""
    device: Optional[str] = None
    """a torch device to require, e.g. `cuda`, `cuda:1`, `cpu` (overrides --cuda; an error if unavailable)"""
    cuda_graph: bool = True
    """on CUDA, replay the SAC update and the dynamics step as recorded CUDA graphs (same math; H200: 12× faster)"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases"""
    wandb_project_name: str = "mopo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    save_model: bool = False
    """if toggled, save actor and critics to `runs/{run_name}/model.pt` (the dynamics are always saved)"""
    checkpoint_freq: int = 10
    """write `runs/{run_name}/checkpoint.pt` every this many epochs (and on SIGTERM)"""
    resume: Optional[str] = None
    """continue a run from its folder or checkpoint file; all other settings come from the checkpoint"""

    # data
    env_id: str = "hopper-medium-v2"
    """D4RL task, {halfcheetah,hopper,walker2d,ant}-{random,medium,medium-replay,medium-expert,expert,full-replay}-v2;
    the paper's halfcheetah-jump or ant-angle; a Minari id (mujoco/hopper/medium-v0); or, with --dataset-path, a
    gymnasium MuJoCo id such as InvertedPendulum-v4 (raw returns: no reference scores)"""
    dataset_path: Optional[str] = None
    """a local hdf5 in D4RL layout used instead of the D4RL download; `--env-id` still names the task"""

    # dynamics ensemble (D2-D5)
    num_ensemble: int = 7
    """number of ensemble members"""
    num_elites: int = 5
    """number of elite members used to sample model transitions"""
    dynamics_hidden_dim: int = 200
    """width of the 4 hidden layers of each member"""
    dynamics_lr: float = 1e-3
    """Adam learning rate of the dynamics ensemble"""
    dynamics_batch_size: int = 256
    """minibatch size per member for dynamics training"""
    holdout_size: int = 1000
    """held-out transitions for early stopping (at most 20% of the data)"""
    dynamics_max_epochs: Optional[int] = None
    """cap on dynamics training epochs (default: until early stopping)"""
    dynamics_path: Optional[str] = None
    """reuse a trained ensemble (a run folder or its dynamics.pt) instead of training one"""
    spectral_norm: bool = False
    """the paper's Lipschitz-regularized model: spectral norm on all dynamics layers but the variance head (D16)"""

    # MOPO (Alg. 2)
    lam: Optional[float] = None
    """λ, the penalty coefficient (default: the published value for the task, see README)"""
    rollout_length: Optional[int] = None
    """h, the model rollout horizon (default: the published value for the task)"""
    rollout_batch_size: int = 50_000
    """start states per rollout round"""
    rollout_freq: int = 1000
    """gradient updates between rollout rounds"""
    model_retain_epochs: int = 5
    """rollout rounds the FIFO model buffer holds"""
    real_ratio: float = 0.05
    """share of real transitions in each SAC batch"""
    penalty: Literal["aleatoric", "ensemble-std"] = "aleatoric"
    """u(s,a): `aleatoric` = max_i ‖σ_i‖ (paper), `ensemble-std` = max_i ‖μ_i − mean μ‖ (disagreement)"""

    # SAC
    batch_size: int = 256
    """SAC batch size (real + model)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network smoothing coefficient"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: float = 3e-4
    """critic learning rate"""
    alpha_lr: float = 3e-4
    """entropy temperature learning rate"""
    autotune: bool = True
    """automatic tuning of the entropy temperature α"""
    alpha: float = 1.0
    """α when `--no-autotune`, else its initial value (authors: 1.0)"""
    target_entropy: float = -3.0
    """target entropy H̄ for autotuning (authors' code: −3 for every task)"""

    # schedule and evaluation
    epochs: int = 1000
    """training epochs (0: only train and save the dynamics ensemble)"""
    steps_per_epoch: int = 1000
    """gradient updates per epoch"""
    eval_freq: int = 1
    """evaluate every this many epochs (and always after the last)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per evaluation"""
    gauge: bool = True
    """also run each evaluation's policy in the learned model (Theorem 4.4's gauge, D17; on CUDA a recorded graph)"""
    log_freq: int = 1000
    """log losses every this many gradient updates"""


def check_args(args: Args) -> None:
    """One clear line per bad flag, before anything is loaded or trained."""
    rules = [
        (args.lam is None or args.lam >= 0, f"--lam must be >= 0, got {args.lam}"),
        (args.rollout_length is None or args.rollout_length >= 1,
         f"--rollout-length must be >= 1, got {args.rollout_length}"),
        (0.0 <= args.real_ratio <= 1.0, f"--real-ratio must be in [0, 1], got {args.real_ratio}"),
        (args.num_ensemble >= 1, f"--num-ensemble must be >= 1, got {args.num_ensemble}"),
        (1 <= args.num_elites <= args.num_ensemble,
         f"--num-elites must be in [1, --num-ensemble={args.num_ensemble}], got {args.num_elites}"),
        (args.dynamics_max_epochs is None or args.dynamics_max_epochs >= 1, "--dynamics-max-epochs must be >= 1"),
        (0.0 <= args.gamma <= 1.0 and 0.0 < args.tau <= 1.0, "--gamma must be in [0, 1] and --tau in (0, 1]"),
        (args.alpha > 0, f"--alpha must be > 0, got {args.alpha}"),
        (args.epochs >= 0, f"--epochs must be >= 0, got {args.epochs}"),
    ]
    for name in ("batch_size", "dynamics_batch_size", "rollout_batch_size", "rollout_freq", "model_retain_epochs",
                 "steps_per_epoch", "eval_freq", "eval_episodes", "log_freq", "holdout_size", "dynamics_hidden_dim",
                 "checkpoint_freq"):
        rules.append((getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"))
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


def pick_device(args: Args) -> torch.device:
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and args.cuda else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for CUDA, but torch sees no CUDA device; run with --device cpu "
                         f"or install a CUDA build of torch")
    return device


# === 2. Data: D4RL tasks, download and cache, replay buffers ===
# family: (gymnasium env id, gym.make kwargs, D4RL reference min and max return for the normalized score)
D4RL_FAMILIES = {
    "hopper": ("Hopper-v4", {}, -20.272305, 3234.3),
    "halfcheetah": ("HalfCheetah-v4", {}, -280.178953, 12135.0),
    "walker2d": ("Walker2d-v4", {}, 1.629008, 4592.3),
    "ant": ("Ant-v4", {"use_contact_forces": True}, -325.6, 3879.7),  # D14: D4RL's 111-dim observation
}
D4RL_DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{file}"
# (h, λ) per dataset and family (D15): OfflineRL-Kit's -v2 settings; random: the authors' -v0 configs.
TASK_DEFAULTS = {
    "medium": {"halfcheetah": (5, 0.5), "hopper": (5, 5.0), "walker2d": (5, 0.5)},
    "medium-replay": {"halfcheetah": (5, 0.5), "hopper": (5, 2.5), "walker2d": (1, 2.5)},
    "medium-expert": {"halfcheetah": (5, 2.5), "hopper": (5, 5.0), "walker2d": (1, 2.5)},
    "random": {"halfcheetah": (5, 0.5), "hopper": (5, 1.0), "walker2d": (1, 1.0)},
}
# Ours, with no published value: expert data is as narrow as medium-expert's and full-replay as broad as
# medium-replay's, so they take those settings; ant and gymnasium/Minari tasks without a match: h 5, λ 1.0, the middle
# of the published λ range.
TASK_DEFAULTS |= {"expert": TASK_DEFAULTS["medium-expert"], "full-replay": TASK_DEFAULTS["medium-replay"]}
OTHER_TASK_DEFAULT = (5, 1.0)
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "next_observations")


@dataclass
class Task:
    env_id: str  # as the user typed it
    family: str  # picks the termination function
    dataset: Optional[str]  # D4RL dataset type (random, medium, ...); None for a gymnasium task
    gym_id: str  # the gymnasium env used for evaluation
    gym_kwargs: dict
    ref_min: Optional[float]  # D4RL reference returns; None where none exist
    ref_max: Optional[float]
    file_name: Optional[str]  # D4RL's file name (None for a gymnasium task, which needs --dataset-path)
    reward_fn: Optional[Callable] = None  # relabels every reward (the paper's out-of-distribution tasks)
    zero_contact: bool = False  # D4RL ant: contact forces were all zero in the data (D14)
    minari_id: Optional[str] = None


def halfcheetah_jump_reward(obs, act, next_obs):
    """Sec. 5.2: r = min(v_x, 3) − 0.1‖a‖² + 15·(z − z_init). HalfCheetah observes [qpos[1:] (8), qvel (9)]:
    z = qpos[1] = next_obs[0], whose initial value init_qpos[1] is 0, and v_x = qvel[0] = next_obs[8] after the step
    (the env's own Δx/dt needs x, which the observation lacks)."""
    return np.minimum(next_obs[:, 8], 3.0) - 0.1 * np.square(act).sum(1) + 15.0 * next_obs[:, 0]


def ant_angle_reward(obs, act, next_obs):
    """Sec. 5.2: r = v_xy·(cos 30°, sin 30°) − 0.5‖a‖² − 5e-4‖clip(contact forces)‖² + 1. Ant observes [qpos[2:] (13),
    qvel (14), contact forces clipped to ±1 (84)]: v_xy = qvel[:2] = next_obs[13:15] after the step."""
    direction = np.array([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    return (next_obs[:, 13:15] @ direction - 0.5 * np.square(act).sum(1) - 5e-4 * np.square(next_obs[:, 27:]).sum(1)
            + 1.0)


OOD_TASKS = {"halfcheetah-jump": ("halfcheetah", halfcheetah_jump_reward), "ant-angle": ("ant", ant_angle_reward)}


def make_task(env_id: str) -> Task:
    if "/" in env_id:
        return minari_task(env_id)
    if env_id in OOD_TASKS:  # Sec. 5.2: SAC replay data of the ordinary task (D4RL full-replay), rewards relabelled
        family, reward_fn = OOD_TASKS[env_id]
        task = make_task(f"{family}-full-replay-v2")
        return replace(task, env_id=env_id, ref_min=None, ref_max=None, reward_fn=reward_fn)
    family, _, rest = env_id.partition("-")
    dataset = rest[: -len("-v2")] if rest.endswith("-v2") else None
    if env_id in gym.registry and family.lower() in TERMINATION_FNS:  # a task D4RL lacks: no reference scores
        return Task(env_id, family.lower(), None, env_id, {}, None, None, None)
    if family not in D4RL_FAMILIES or dataset not in D4RL_DATASETS:
        valid = f"{{{','.join(D4RL_FAMILIES)}}}-{{{','.join(D4RL_DATASETS)}}}-v2"
        raise ValueError(f"unknown --env-id {env_id!r}; valid D4RL ids: {valid}; {', '.join(OOD_TASKS)}; a Minari "
                         f"id (e.g. mujoco/hopper/medium-v0); or, with --dataset-path, a gymnasium id of "
                         f"{sorted(TERMINATION_FNS)}, e.g. Hopper-v4, InvertedPendulum-v4")
    gym_id, gym_kwargs, ref_min, ref_max = D4RL_FAMILIES[family]
    file_name = f"{family}_{dataset.replace('-', '_')}-v2.hdf5"  # d4rl's own name, so its cache is reused
    return Task(env_id, family, dataset, gym_id, gym_kwargs, ref_min, ref_max, file_name, zero_contact=family == "ant")


def minari_task(env_id: str) -> Task:
    """A Minari dataset (e.g. mujoco/hopper/medium-v0): its own eval env and reference scores."""
    try:
        import minari
    except ImportError as e:
        raise ImportError(f"--env-id {env_id} is a Minari dataset: pip install 'minari[hdf5]' pillow") from e
    if env_id not in minari.list_local_datasets():
        try:
            minari.download_dataset(env_id)
        except Exception as e:  # minari raises several kinds when offline or the id is unknown
            raise ConnectionError(f"could not fetch Minari dataset {env_id} ({e}); check the id, or place it under "
                                  f"$MINARI_DATASETS_PATH (default ~/.minari/datasets)") from e
    dataset = minari.load_dataset(env_id)
    spec = dataset.recover_environment(eval_env=True).spec
    family = spec.id.split("-")[0].lower()
    if family not in TERMINATION_FNS:
        raise ValueError(f"{env_id} runs in {spec.id}, which has no termination function here "
                         f"({sorted(TERMINATION_FNS)})")
    meta = dataset.storage.metadata
    return Task(env_id, family, env_id.rsplit("/", 1)[-1].rsplit("-v", 1)[0], spec.id,
                {**spec.kwargs, "max_episode_steps": spec.max_episode_steps}, meta.get("ref_min_score"),
                meta.get("ref_max_score"), None, minari_id=env_id)


def d4rl_cache_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def check_hdf5(path: Path, fix: str = "") -> None:
    """Cheap structural check of a D4RL-layout file: it opens, has the required keys, and they have one length.
    `fix` is appended to the error (how to re-fetch a damaged cache entry)."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            lengths = {k: f[k].shape[0] if f[k].ndim else 0 for k in REQUIRED_KEYS if k in f}
    except OSError as e:
        raise ValueError(f"{path} is not a readable hdf5 file ({e}){fix}") from e
    if missing:
        raise ValueError(f"{path} lacks key(s) {missing}; a D4RL-layout file needs {list(REQUIRED_KEYS)}{fix}")
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: keys have different lengths {lengths}; each key needs one row per transition{fix}")


def download(url: str, path: Path, attempts: int = 3) -> None:
    """Fetch url into `path.part` (resuming it where the server honours Range), check it, then rename to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        try:
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.getcode() != 206:  # the server sent the whole file: start over
                    have = 0
                size = int(response.headers.get("Content-Length") or 0)
                total = have + size if size else None
                bar = tqdm(initial=have, total=total, unit="B", unit_scale=True, desc=f"download {path.name}",
                           disable=None)  # bars only on a terminal
                with open(part, "ab" if have else "wb") as f, bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and part.stat().st_size < total:
                raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
            break
        except (OSError, http.client.HTTPException) as e:
            if attempt == attempts or isinstance(e, urllib.error.HTTPError):
                raise ConnectionError(f"could not download {url} to {path} ({e!r}); the partial file {part} "
                                      f"resumes on the next run, or fetch the file by hand and place it at {path}, "
                                      f"or pass --dataset-path") from e
            print(f"download interrupted ({e!r}); resuming ({attempt}/{attempts - 1})")
    try:
        check_hdf5(part)
    except ValueError as e:
        part.unlink()
        raise ValueError(f"downloaded {url}, but it is not a valid D4RL file ({e}); deleted it, run again") from e
    part.replace(path)


def load_dataset(path: Path, obs_dim: int, act_dim: int, fix: str = "") -> dict:
    """Read a D4RL-layout hdf5 and check it against the env: a dict of float32 arrays (D12)."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist; check --dataset-path")
    check_hdf5(path, fix)
    with h5py.File(path, "r") as f:
        return check_dataset({k: f[k][()] for k in REQUIRED_KEYS}, path, obs_dim, act_dim)


def check_dataset(data: dict, path, obs_dim: int, act_dim: int) -> dict:
    data = {k: np.asarray(data[k], dtype=np.float32) for k in REQUIRED_KEYS}
    n = len(data["observations"])
    data["rewards"] = data["rewards"].reshape(n, -1).squeeze(-1)
    data["terminals"] = data["terminals"].reshape(n, -1).squeeze(-1)
    expected = {"observations": (n, obs_dim), "next_observations": (n, obs_dim), "actions": (n, act_dim),
                "rewards": (n,), "terminals": (n,)}
    for key, shape in expected.items():
        if data[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {data[key].shape}, expected {shape} for this env "
                             f"(obs_dim {obs_dim}, act_dim {act_dim}); does --env-id match the dataset?")
        if not np.isfinite(data[key]).all():
            raise ValueError(f"{path}: {key} holds NaN or inf values; clean the dataset first")
    return data


def get_dataset(task: Task, dataset_path: Optional[str], obs_dim: int, act_dim: int) -> dict:
    if dataset_path is not None:
        data = load_dataset(Path(dataset_path), obs_dim, act_dim)
    elif task.minari_id is not None:
        import minari

        episodes = list(minari.load_dataset(task.minari_id).iterate_episodes())
        data = check_dataset({"observations": np.concatenate([e.observations[:-1] for e in episodes]),
                              "next_observations": np.concatenate([e.observations[1:] for e in episodes]),
                              "actions": np.concatenate([e.actions for e in episodes]),
                              "rewards": np.concatenate([e.rewards for e in episodes]),
                              "terminals": np.concatenate([e.terminations for e in episodes])},
                             task.minari_id, obs_dim, act_dim)
    elif task.file_name is None:
        raise ValueError(f"--env-id {task.env_id} is not a D4RL task, so it needs --dataset-path")
    else:
        path = d4rl_cache_dir() / task.file_name
        if not path.exists():
            download(D4RL_URL.format(file=task.file_name), path)
        # never train on a damaged cache entry: say how to re-fetch it
        data = load_dataset(path, obs_dim, act_dim, f"; the cached file is damaged: delete it with `rm {path}` and "
                                                    f"run again to re-download, or place a good copy there")
    if task.reward_fn is not None:  # Sec. 5.2: every reward relabelled with the new task's
        data["rewards"] = task.reward_fn(data["observations"], data["actions"], data["next_observations"])
        data["rewards"] = data["rewards"].astype(np.float32)
    return data


class ReplayBuffer:
    """Transitions as rows [s, a, r, s', done] of one [capacity, width] tensor on the training device; once full,
    new rows overwrite the oldest (FIFO, D9). Sampling is uniform with device-side indices, and reads the fill level
    from a device tensor, so a captured CUDA graph keeps sampling every row as the buffer grows."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.fields = (obs_dim, act_dim, 1, obs_dim, 1)
        self.data = torch.zeros(capacity, sum(self.fields), device=device)
        self.capacity, self.ptr, self.size = capacity, 0, 0
        self.count = torch.zeros((), dtype=torch.long, device=device)  # = size, on the device

    def add(self, rows: torch.Tensor) -> None:
        rows = rows[-self.capacity:]  # [n, width]
        n = len(rows)
        first = min(n, self.capacity - self.ptr)  # rows that fit before the end; the rest wrap to the front
        self.data[self.ptr: self.ptr + first] = rows[:first]  # in place: a graph reading self.data sees them
        self.data[: n - first] = rows[first:]
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)
        self.count.fill_(self.size)

    def sample(self, n: int) -> torch.Tensor:
        idx = torch.randint(2**62, (n,), device=self.data.device) % self.count  # uniform in [0, size)
        return self.data[idx]  # [n, width]

    def split(self, rows: torch.Tensor):
        obs, act, rew, next_obs, done = rows.split(self.fields, dim=1)
        return obs, act, rew.squeeze(1), next_obs, done.squeeze(1)  # rew, done: [n]


def to_rows(obs, act, rew, next_obs, done) -> torch.Tensor:
    return torch.cat([obs, act, rew[:, None], next_obs, done[:, None].float()], dim=1)


def sample_mixed(real: ReplayBuffer, model: ReplayBuffer, batch_size: int, real_ratio: float) -> torch.Tensor:
    """D10: int(real_ratio·B) real rows, the rest from the model buffer, as one fused batch."""
    n_real = int(real_ratio * batch_size)
    return torch.cat([real.sample(n_real), model.sample(batch_size - n_real)])


# === 3. Termination functions: done(s, a, s') on batches [B, obs_dim] → [B] bool (D11) ===
def hopper_done(obs, act, next_obs):
    height, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (torch.isfinite(next_obs).all(1) & (next_obs[:, 1:].abs() < 100).all(1)  # the old code: abs(... < 100)
               & (height > 0.7) & (angle.abs() < 0.2))
    return ~healthy


def walker2d_done(obs, act, next_obs):
    height, angle = next_obs[:, 0], next_obs[:, 1]
    return ~((height > 0.8) & (height < 2.0) & (angle > -1.0) & (angle < 1.0))


def halfcheetah_done(obs, act, next_obs):
    return torch.zeros(len(next_obs), dtype=torch.bool, device=next_obs.device)


def ant_done(obs, act, next_obs):
    height = next_obs[:, 0]
    return ~(torch.isfinite(next_obs).all(1) & (height >= 0.2) & (height <= 1.0))


def invertedpendulum_done(obs, act, next_obs):  # the pole's angle leaves ±0.2 rad
    return ~(torch.isfinite(next_obs).all(1) & (next_obs[:, 1].abs() <= 0.2))


TERMINATION_FNS: dict[str, Callable] = {
    "hopper": hopper_done, "walker2d": walker2d_done, "halfcheetah": halfcheetah_done, "ant": ant_done,
    "invertedpendulum": invertedpendulum_done,
}


# === 4. Ensemble dynamics p̂(s', r | s, a) (Sec. 4.3, authors' BNN) ===
class EnsembleLinear(nn.Module):
    """E independent linear layers as one batched matmul: [E, B, in] → [E, B, out]. Init per member as nn.Linear."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int, spectral_norm: bool = False):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_dim).uniform_(-bound, bound))
        self.spectral_norm = spectral_norm
        if spectral_norm:
            self.register_buffer("sn_u", torch.ones(num_members, out_dim) / math.sqrt(out_dim))  # [E, out]

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.normalized_weight() if self.spectral_norm else self.weight)

    def normalized_weight(self):
        """W / σ_max(W) per member (Miyato et al. 2018): σ = vᵀWu, u refined by one power-iteration step per training
        forward (after training, `train_dynamics` sets u exactly)."""
        with torch.no_grad():
            v = F.normalize(torch.einsum("eio,eo->ei", self.weight, self.sn_u), dim=1)  # [E, in]
            if self.training:
                self.sn_u.copy_(F.normalize(torch.einsum("eio,ei->eo", self.weight, v), dim=1))  # [E, out]
                v = F.normalize(torch.einsum("eio,eo->ei", self.weight, self.sn_u), dim=1)
        sigma = torch.einsum("ei,eio,eo->e", v, self.weight, self.sn_u)  # [E], differentiable in W
        return self.weight / sigma[:, None, None]


class EnsembleDynamics(nn.Module):
    """Gaussian ensemble: (s, a) → mean and log-variance of [r, Δs] for every member (D1–D3)."""

    weight_decays = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4, 1e-4)  # D4: hidden layers 1..4, mean head, log-var head

    def __init__(self, obs_dim: int, act_dim: int, num_ensemble: int = 7, num_elites: int = 5, hidden_dim: int = 200,
                 spectral_norm: bool = False):
        super().__init__()
        self.config = {"obs_dim": obs_dim, "act_dim": act_dim, "num_ensemble": num_ensemble, "num_elites": num_elites,
                       "dynamics_hidden_dim": hidden_dim, "spectral_norm": spectral_norm}  # checked by load_dynamics
        in_dim, out_dim = obs_dim + act_dim, 1 + obs_dim
        dims = (in_dim, hidden_dim, hidden_dim, hidden_dim, hidden_dim)
        # D16: the paper's Lipschitz-regularized mean: spectral norm on every layer but the log-variance head
        self.hidden = nn.ModuleList(EnsembleLinear(num_ensemble, i, o, spectral_norm) for i, o in zip(dims, dims[1:]))
        self.mean_head = EnsembleLinear(num_ensemble, hidden_dim, out_dim, spectral_norm)
        self.logvar_head = EnsembleLinear(num_ensemble, hidden_dim, out_dim)
        for layer in self.layers():  # D2: the authors' truncated-normal init
            std = 1 / (2 * math.sqrt(layer.weight.shape[1]))
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)
        self.max_logvar = nn.Parameter(torch.full((out_dim,), 0.5))  # D3
        self.min_logvar = nn.Parameter(torch.full((out_dim,), -10.0))
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.register_buffer("elites", torch.arange(num_elites))

    def layers(self):
        return [*self.hidden, self.mean_head, self.logvar_head]

    def forward(self, obs, act):
        """obs, act: [B, ·] (same rows for every member) or [E, B, ·] → mean, logvar: [E, B, 1 + obs_dim]."""
        x = (torch.cat([obs, act], dim=-1) - self.input_mean) / self.input_std
        if x.dim() == 2:
            x = x.expand(self.mean_head.weight.shape[0], *x.shape)  # [E, B, in]
        for layer in self.hidden:
            x = F.silu(layer(x))  # swish
        mean, logvar = self.mean_head(x), self.logvar_head(x)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)  # D3: soft bounds
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar


def gaussian_nll(mean, logvar, target):
    """Per-member Gaussian NLL without its constant, mean over batch and dims: [E, B, D] → [E]. Equals
    2·(−log N(target; mean, e^logvar)) − log 2π, averaged."""
    return ((mean - target).pow(2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2))


def dynamics_loss(model: EnsembleDynamics, obs, act, target):
    """D4: NLL summed over members + the log-var bound terms. Inputs [E, B, ·] (each member its own rows). The L2
    term 0.5·wd·Σw² is left to `dynamics_optimizer`, whose weight decay adds its gradient wd·w."""
    loss = gaussian_nll(*model(obs, act), target).sum()
    return loss + 0.01 * model.max_logvar.sum() - 0.01 * model.min_logvar.sum()


def dynamics_optimizer(model: EnsembleDynamics, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """Adam with each layer's weight decay (D4) as coupled L2, the gradient of 0.5·wd·Σw² in the loss, without
    building that term in the graph; biases and log-var bounds are not decayed (authors' code)."""
    groups = [{"params": [layer.weight], "weight_decay": wd} for layer, wd in zip(model.layers(), model.weight_decays)]
    rest = [p for p in model.parameters() if all(p is not g["params"][0] for g in groups)]
    return adam(groups + [{"params": rest}], lr, model.input_mean.device, capturable)


def adam(params, lr: float, device: torch.device, capturable: bool = False) -> torch.optim.Adam:
    """Fused Adam where torch has it: one kernel per step (8% off a CPU SAC update, benchmarks/speed.py).
    `capturable` keeps its step count on the GPU, which a CUDA graph needs (eager, it costs a little)."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"), capturable=capturable)


def cuda_graph(fn: Callable) -> Callable:
    """Speed, GPU only: these small networks are launch-bound, so record fn's kernels once and replay them in one
    launch. fn must touch only tensors that stay in place (weights, optimizer states, buffers, fixed inputs); then
    each call of the result is one more call of fn, and returns the graph's outputs, overwritten by each replay."""
    graph, side, outputs = torch.cuda.CUDAGraph(), torch.cuda.Stream(), []

    def call():
        if len(outputs) < 3:  # warm-up calls run eagerly on a side stream, as torch asks before a capture
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs.append(fn())
            torch.cuda.current_stream().wait_stream(side)
            return outputs[-1]
        if len(outputs) == 3:
            with torch.cuda.graph(graph):  # records the 4th call, runs nothing
                outputs.append(fn())
        graph.replay()
        return outputs[-1]
    return call


def make_model_data(real: ReplayBuffer):
    """Model inputs (s, a) and targets [r, Δs] (D1) from every real transition."""
    obs, act, rew, next_obs, _ = real.split(real.data[: real.size])
    return obs, act, torch.cat([rew[:, None], next_obs - obs], dim=1)


@torch.no_grad()
def holdout_mse(model, obs, act, target):
    mean, _ = model(obs, act)  # [E, B, 1 + obs_dim]
    return (mean - target).pow(2).mean(dim=(1, 2))  # [E]


def select_elites(model: EnsembleDynamics, obs, act, target):
    """D5: the members with the lowest holdout MSE become the elites. Returns every member's MSE [E]."""
    mse = holdout_mse(model, obs, act, target)
    model.elites.copy_(mse.argsort()[: len(model.elites)])
    return mse


def train_dynamics(model: EnsembleDynamics, obs, act, target, args: Args, writer=None, state=None, save=None,
                   sigterm=()) -> dict:
    """D5: bootstrap per member, holdout early stopping with per-member snapshots, then pick elites. Preemptible:
    `save(state, stop)` gets the training state after each epoch, and with stop=True at the minibatch where a SIGTERM
    arrived (`sigterm` non-empty); passed back as `state`, it trains on to the same ensemble (CPU, deterministic)."""
    E, B = args.num_ensemble, args.dynamics_batch_size
    graph = getattr(args, "cuda_graph", False) and obs.is_cuda
    shuffle = lambda boot: boot.gather(1, torch.rand(boot.shape, device=boot.device).argsort(dim=1))  # per member
    optimizer = dynamics_optimizer(model, args.dynamics_lr, capturable=graph)
    member_params = [p for layer in model.layers() for p in (layer.weight, layer.bias)]  # ensemble axis first
    if state is None:
        perm = torch.randperm(len(obs), device=obs.device)
        n_holdout = min(int(0.2 * len(obs)), args.holdout_size)
        if n_holdout < 1:
            raise ValueError(f"dataset of {len(obs)} transitions is too small to hold out any for early stopping")
        hold, train = perm[:n_holdout], perm[n_holdout:]
        inputs = torch.cat([obs[train], act[train]], dim=1)
        model.input_mean.copy_(inputs.mean(0))
        std = inputs.std(0, unbiased=False)  # np.std, as the authors' scaler
        model.input_std.copy_(torch.where(std < 1e-12, torch.ones_like(std), std))
        state = {"epoch": 0, "batch": 0, "epochs_since_update": 0, "hold": hold, "loss_sum": obs.new_zeros(()),
                 "best": obs.new_full((E,), 1e10), "snapshot": [p.detach().clone() for p in member_params],
                 "boot": shuffle(train[torch.randint(len(train), (E, len(train)), device=obs.device)])}  # [E, N]
    else:  # a checkpoint's state, loaded on the CPU
        state = {k: v.to(obs.device) if torch.is_tensor(v) else v for k, v in state.items()}
        state["snapshot"] = [s.to(obs.device) for s in state["snapshot"]]
        optimizer.load_state_dict(state["optimizer"])
    hold, n_batches = state["hold"], -(-state["boot"].shape[1] // B)

    def fit(idx):  # one Adam step; idx [E, B]: each member its own bootstrap rows
        loss = dynamics_loss(model, obs[idx], act[idx], target[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    batch_idx = state["boot"][:, :B].clone()  # the CUDA graph's fixed input, refilled before each replay
    fit_graph = cuda_graph(lambda: fit(batch_idx)) if graph else None
    bar = tqdm(desc="dynamics", unit="epoch", initial=state["epoch"], total=args.dynamics_max_epochs, disable=None)
    while True:
        for b in range(state["batch"], state["boot"].shape[1], B):
            if sigterm:
                save(state | {"batch": b, "optimizer": optimizer.state_dict()}, True)
            idx = state["boot"][:, b: b + B]  # [E, ≤B]
            if graph and idx.shape[1] == B:
                batch_idx.copy_(idx)
                state["loss_sum"] += fit_graph()
            else:  # CPU, or the last, shorter minibatch
                state["loss_sum"] += fit(idx)
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
        mse = holdout_mse(model, obs[hold], act[hold], target[hold])  # [E]
        improved = (state["best"] - mse) / state["best"] > 0.01
        state["best"] = torch.where(improved, mse, state["best"])
        for p, s in zip(member_params, state["snapshot"]):
            s[improved] = p.detach()[improved]
        state["epochs_since_update"] = 0 if improved.any() else state["epochs_since_update"] + 1
        scalars = {"dynamics/train_loss": state["loss_sum"].item() / n_batches,
                   "dynamics/holdout_mse": mse.mean().item()}
        state["loss_sum"] = torch.zeros_like(state["loss_sum"])
        log_scalars(writer, scalars, state["epoch"], None, where="dynamics epoch")
        bar.update()
        bar.set_postfix(holdout_mse=f"{scalars['dynamics/holdout_mse']:.4g}")
        if state["epochs_since_update"] > 5 or state["epoch"] == args.dynamics_max_epochs:
            break
        state["boot"] = shuffle(state["boot"])  # the next epoch's order, saved with the checkpoint
        if save is not None:
            save(state | {"optimizer": optimizer.state_dict()}, bool(sigterm))
    bar.close()
    with torch.no_grad():
        for p, s in zip(member_params, state["snapshot"]):
            p.copy_(s)
        for layer in model.layers():  # D16: exact σ for the restored weights (u = the top right singular vector)
            if layer.spectral_norm:
                layer.sn_u.copy_(torch.linalg.svd(layer.weight, full_matrices=False).Vh[:, 0])  # [E, out]
    mse = select_elites(model, obs[hold], act[hold], target[hold])
    stats = {"epochs": state["epoch"], "holdout_mse": mse.mean().item(), "member_holdout_mse": mse.tolist(),
             "elite_holdout_mse": mse[model.elites].mean().item()}
    log_scalars(writer, {"dynamics/epochs": state["epoch"], "dynamics/elite_holdout_mse": stats["elite_holdout_mse"]},
                0, None, where="the end of dynamics training, step")
    return stats


# === 5. MOPO: uncertainty-penalized model rollouts (Alg. 2) ===
ROLLOUT_CHUNK_CPU = 1024  # rows per rollout chunk on CPU (see `rollout`)


def penalty(mean, logvar, kind: str = "aleatoric"):
    """u(s, a) [B] from every member's prediction; mean, logvar: [E, B, 1 + obs_dim] (D6)."""
    if kind == "aleatoric":
        return logvar.mul(0.5).exp().norm(dim=-1).amax(dim=0)  # Sec. 4.3: max_i ‖σ_i(s,a)‖
    if kind == "ensemble-std":
        delta = mean[..., 1:]  # [E, B, obs_dim]: the Δs dims
        return (delta - delta.mean(dim=0)).norm(dim=-1).amax(dim=0)
    raise ValueError(f"unknown penalty {kind!r}; use aleatoric or ensemble-std")


def model_step(model: EnsembleDynamics, obs, act, penalty_kind: str, termination_fn: Callable):
    """One step in the learned model from obs, act [B, ·]: (sampled reward r [B], penalty u [B], s' [B, obs_dim],
    done [B] bool). The penalized MDP's reward is r̃ = r − λ·u (Alg. 2)."""
    mean, logvar = model(obs, act)  # [E, B, 1 + obs_dim]
    u = penalty(mean, logvar, penalty_kind)  # [B]
    member = model.elites[torch.randint(len(model.elites), (len(obs),), device=obs.device)]  # D7
    row = torch.arange(len(obs), device=obs.device)
    mu, std = mean[member, row], logvar[member, row].mul(0.5).exp()  # [B, 1 + obs_dim]
    sample = mu + std * torch.randn(mu.shape, device=mu.device)
    rew, next_obs = sample[:, 0], obs + sample[:, 1:]
    done = termination_fn(obs, act, next_obs)  # [B] bool
    if not rew.shape == u.shape == done.shape == (len(obs),):
        raise ValueError(f"model step: reward {rew.shape}, penalty {u.shape}, done {done.shape}; expected ({len(obs)},)")
    return rew, u, next_obs, done


@torch.no_grad()
def rollout(actor, model: EnsembleDynamics, start_obs, rollout_length: int, lam: float, penalty_kind: str,
            termination_fn: Callable, chunk_size: Optional[int] = None):
    """h-step branched rollouts from start_obs [B, obs_dim] under the current policy in the penalized MDP.
    Returns transition rows [M, width] (M ≤ B·h) and a dict of statistics (tensors)."""
    rows, raw_rew, pen, terminal = [], [], [], []
    # CPU: 1,024-row chunks keep the [E, chunk, 200] activations in cache (25% faster than 10k rows); GPU: one chunk
    chunk_size = chunk_size or (ROLLOUT_CHUNK_CPU if start_obs.device.type == "cpu" else len(start_obs))
    for obs in start_obs.split(chunk_size):
        for _ in range(rollout_length):
            act, _ = actor.sample(obs)  # D8: the current stochastic policy
            rew, u, next_obs, done = model_step(model, obs, act, penalty_kind, termination_fn)
            rows.append(to_rows(obs, act, rew - lam * u, next_obs, done))  # Alg. 2: r̃ = r − λ·u(s, a)
            raw_rew.append(rew), pen.append(u), terminal.append(done)
            obs = next_obs[~done]  # terminated branches stop
            if len(obs) == 0:
                break
    raw_rew, pen, terminal = torch.cat(raw_rew), torch.cat(pen), torch.cat(terminal).float()
    stats = {"penalty_mean": pen.mean(), "penalty_max": pen.max(), "raw_reward_mean": raw_rew.mean(),
             "penalized_reward_mean": (raw_rew - lam * pen).mean(), "terminal_frac": terminal.mean()}
    return torch.cat(rows), stats


@torch.no_grad()
def model_returns(actor, model: EnsembleDynamics, start_obs, horizon: int, lam: float, penalty_kind: str,
                  termination_fn: Callable, seed: int = 0, graph: bool = False) -> dict:
    """Theorem 4.4's gauge (D17): the deterministic policy's episodes in the learned model from start_obs [N, obs_dim],
    up to `horizon` steps or the termination function. Per episode [N], on start_obs's device: the raw model return
    Σ r (η of M̂), the penalized return Σ (r − λ·u) (η of M̃, a lower bound of the true return when λ·u bounds the
    model's error), and the length. Random numbers from `seed`; training's generators are restored after. With
    `graph` (CUDA) each step is replayed as a recorded graph and all `horizon` steps run: no host sync at all."""
    obs = start_obs.clone()
    ret, penalized, length = (torch.zeros(len(obs), device=obs.device) for _ in range(3))
    alive = torch.ones(len(obs), dtype=torch.bool, device=obs.device)

    def step():  # in place; a finished episode keeps stepping (fixed shapes) but earns nothing
        rew, u, next_obs, done = model_step(model, obs, actor.act(obs), penalty_kind, termination_fn)
        ret.add_(torch.where(alive, rew, 0.0))
        penalized.add_(torch.where(alive, rew - lam * u, 0.0))
        length.add_(alive)
        alive.logical_and_(~done)
        obs.copy_(next_obs)
    run = cuda_graph(step) if graph else step
    with torch.random.fork_rng(devices=[obs.device] if obs.is_cuda else []):
        torch.manual_seed(seed)
        for _ in range(horizon):
            run()
            if not graph and not alive.any():
                break
    return {"model_return": ret, "penalized_model_return": penalized, "model_length": length}


# === 6. SAC (Haarnoja et al. 2018, as in softlearning; D13) ===
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Actor(nn.Module):
    """Tanh-Gaussian policy, rescaled to the action box."""

    def __init__(self, obs_dim: int, act_dim: int, action_low, action_high, hidden_dim: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                   nn.ReLU())
        self.mean = nn.Linear(hidden_dim, act_dim)
        self.log_std = nn.Linear(hidden_dim, act_dim)
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs):
        h = self.trunk(obs)
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs):
        """Reparameterized action and its log-probability [B] (tanh change of variables)."""
        mean, log_std = self(obs)
        eps = torch.randn_like(mean)
        u = mean + log_std.exp() * eps
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # log(1 − tanh²u), stably
        log_prob = log_prob - self.action_scale.log().sum()
        return torch.tanh(u) * self.action_scale + self.action_bias, log_prob

    def act(self, obs):
        """The deterministic action used for evaluation."""
        return torch.tanh(self(obs)[0]) * self.action_scale + self.action_bias


class TwinQ(nn.Module):
    """Twin critics as one batched module: (s, a) [B, ·] → Q [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256, num_q: int = 2):
        super().__init__()
        self.num_q = num_q
        self.net = nn.Sequential(EnsembleLinear(num_q, obs_dim + act_dim, hidden_dim), nn.ReLU(),
                                 EnsembleLinear(num_q, hidden_dim, hidden_dim), nn.ReLU(),
                                 EnsembleLinear(num_q, hidden_dim, 1))

    def forward(self, obs, act):
        x = torch.cat([obs, act], dim=1).expand(self.num_q, -1, -1)  # [2, B, obs_dim + act_dim]
        return self.net(x).squeeze(-1)  # [2, B]


def soft_bellman_target(rew, done, next_q, next_log_prob, alpha, gamma):
    """y = r + γ·(1 − done)·(min_j Q'_j(s', a') − α·log π(a'|s')), all [B]: a terminal transition has no future."""
    if not (rew.shape == done.shape == next_q.shape == next_log_prob.shape and rew.dim() == 1):  # no silent [B, B]
        raise ValueError(f"Bellman target: reward, done, Q', log π' must all be [B]; got {rew.shape}, {done.shape}, "
                         f"{next_q.shape}, {next_log_prob.shape}")
    return rew + gamma * (1.0 - done) * (next_q - alpha * next_log_prob)


def sac_update(batch, actor, qf, qf_target, log_alpha, q_opt, actor_opt, alpha_opt, args: Args) -> dict:
    """One gradient step of critics, actor and α on one batch; returns detached tensors (no host sync)."""
    obs, act, rew, next_obs, done = batch
    alpha = log_alpha.exp().detach() if args.autotune else args.alpha
    with torch.no_grad():
        next_act, next_log_prob = actor.sample(next_obs)
        next_q = qf_target(next_obs, next_act).min(dim=0).values  # [B]
        target = soft_bellman_target(rew, done, next_q, next_log_prob, alpha, args.gamma)
    q = qf(obs, act)  # [2, B]
    q_loss = 0.5 * (q - target).pow(2).mean(dim=1).sum()  # each critic its own MSE, as separate optimizers would
    q_opt.zero_grad(set_to_none=True)
    q_loss.backward()
    q_opt.step()

    qf.requires_grad_(False)  # the actor's backward needs no critic weight gradients
    new_act, log_prob = actor.sample(obs)
    actor_loss = (alpha * log_prob - qf(obs, new_act).min(dim=0).values).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_opt.step()
    qf.requires_grad_(True)

    info = {"losses/q_loss": q_loss.detach(), "losses/actor_loss": actor_loss.detach(), "losses/alpha": alpha,
            "charts/q_mean": q.mean().detach(), "charts/entropy": -log_prob.mean().detach()}
    if args.autotune:
        alpha_loss = -(log_alpha * (log_prob.detach() + args.target_entropy)).mean()
        alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        alpha_opt.step()
        info["losses/alpha_loss"] = alpha_loss.detach()
    with torch.no_grad():  # Polyak averaging of the target critics, fused
        torch._foreach_lerp_(list(qf_target.parameters()), list(qf.parameters()), args.tau)
    return info


# === 7. Evaluation: deterministic episodes in gymnasium MuJoCo, D4RL normalized score per episode (D14) ===
def make_env(task: Task) -> gym.Env:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of date.*")  # -v4 on purpose: D4RL's obs layout
        env = gym.make(task.gym_id, **task.gym_kwargs)
    return TaskEnv(env, task) if task.zero_contact or task.reward_fn else env


class TaskEnv(gym.Wrapper):
    """The eval env as the task's data saw it: for ant, contact forces zeroed and left out of the reward (D14);
    for the out-of-distribution tasks, the relabelled reward r(s, a, s') (Sec. 5.2)."""

    def __init__(self, env: gym.Env, task: Task):
        super().__init__(env)
        self.task, self.last_obs = task, None

    def observe(self, obs):
        if self.task.zero_contact:  # Ant's observation: 13 qpos, 14 qvel, then 84 contact forces
            obs = obs.copy()
            obs[27:] = 0.0
        return obs

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.last_obs = self.observe(obs)
        return self.last_obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs = self.observe(obs)
        if self.task.zero_contact:
            reward += self.env.unwrapped.contact_cost
        if self.task.reward_fn is not None:
            reward = float(self.task.reward_fn(self.last_obs[None], np.asarray(action)[None], obs[None])[0])
        self.last_obs = obs
        return obs, reward, terminated, truncated, info


def summarize(task: Task, episodes: dict) -> dict:
    """Mean and `_std` over episodes of each per-episode array in `episodes` (return, length, ...) and, where the task
    has reference scores, of the per-episode normalized score (normalizing a std would subtract the min score)."""
    if task.ref_min is not None:
        episodes |= {"normalized_score": 100 * (episodes["return"] - task.ref_min) / (task.ref_max - task.ref_min)}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in episodes.items()}
    return {k: float(v.mean()) for k, v in arrays.items()} | {f"{k}_std": float(v.std()) for k, v in arrays.items()}


@torch.no_grad()
def evaluate(actor: Actor, envs: gym.vector.VectorEnv, obs: np.ndarray) -> dict:
    """One deterministic episode per sub-env from `obs` [N, obs_dim], what `envs.reset` just returned, run side by side:
    {"return": [N], "length": [N]}. `actor` should live on the CPU: each step's action then needs no GPU round trip."""
    returns, lengths, running = np.zeros(envs.num_envs), np.zeros(envs.num_envs), np.ones(envs.num_envs, dtype=bool)
    device = actor.action_scale.device
    while running.any():
        action = actor.act(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * running  # a finished sub-env auto-resets; its later rewards are not counted
        lengths += running
        running &= ~(terminated | truncated)
    return {"return": returns, "length": lengths}


class Evaluator:
    """Evaluation beside training (D18). `start` takes the policy at this update and launches its episodes in the env
    (D14: in a thread, with a CPU copy of the actor) and in the learned model (D17: the gauge, on the training device;
    on CUDA a recorded graph that the GPU runs between updates). `record` waits for them and logs: eval/ scalars, one
    printed line, the evaluation appended to `results`, results.json. On the CPU `start` runs the episodes itself
    and records at once (`in_turn`)."""

    def __init__(self, task: Task, args: Args, actor: Actor, dynamics: EnsembleDynamics, lam: float, graph: bool,
                 writer: SummaryWriter, results: dict, run_dir: Path):
        self.task, self.args, self.actor, self.dynamics, self.lam, self.graph = task, args, actor, dynamics, lam, graph
        self.writer, self.results, self.run_dir = writer, results, run_dir
        self.device = actor.action_scale.device  # the training device
        self.envs = gym.vector.SyncVectorEnv([lambda: make_env(task)] * args.eval_episodes)
        self.cpu_actor = copy.deepcopy(actor).cpu()
        self.horizon = self.envs.envs[0].spec.max_episode_steps or 1000  # the gauge's episodes: as long as the env's
        self.thread, self.pending = ThreadPoolExecutor(max_workers=1), []  # [(episodes, gauge, epoch, step)]
        self.in_turn = self.device.type == "cpu"  # beside training there, it only competes for the same cores
        self.switch_interval = sys.getswitchinterval()

    def start(self, epoch: int, step: int) -> None:
        self.cpu_actor.load_state_dict(self.actor.state_dict())
        obs, _ = self.envs.reset(seed=self.args.seed + step)
        gauge = {}
        if self.args.gauge:  # Theorem 4.4: the same policy from the same start states in the learned model
            start = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
            gauge = model_returns(self.actor, self.dynamics, start, self.horizon, self.lam, self.args.penalty,
                                  TERMINATION_FNS[self.task.family], self.args.seed + step, self.graph)
        if self.in_turn:  # here and now: run in the thread, even waited for, it slowed CPU runs by 20% (2 cores)
            episodes = Future()
            episodes.set_result(evaluate(self.cpu_actor, self.envs, obs))
        else:  # training's thread needs the GIL for ~10 µs per update; at Python's default 5 ms switch interval the
            sys.setswitchinterval(1e-4)  # episodes' Python kept it waiting (H200: +0.99 s per epoch, at 0.1 ms +0.52)
            episodes = self.thread.submit(evaluate, self.cpu_actor, self.envs, obs)
        self.pending.append((episodes, gauge, epoch, step))
        if self.in_turn:
            self.record()

    def record(self) -> None:
        for episodes, gauge, epoch, step in self.pending:
            summary = summarize(self.task, episodes.result() | {k: v.cpu() for k, v in gauge.items()})
            for k, v in summary.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
            shown = [k for k in ("return", "normalized_score", "model_return", "penalized_model_return")
                     if k in summary]
            tqdm.write(f"epoch {epoch} step {step}: " + ", ".join(f"{k} {summary[k]:.1f} ± {summary[k + '_std']:.1f}"
                                                                   for k in shown))
            self.results["evaluations"].append({"step": step, "epoch": epoch, **summary})
            self.results.update({f"final_{k}": summary.get(k) for k in RESULT_KEYS})
            atomic_save(self.run_dir / "results.json", self.results)
        self.pending.clear()
        sys.setswitchinterval(self.switch_interval)

    def close(self) -> None:
        self.thread.shutdown()
        self.envs.close()


# === 8. main: load → train the model → {rollout, SAC update, evaluate, log, checkpoint} → save ===
RESULT_KEYS = ("return", "return_std", "normalized_score", "normalized_score_std")  # results.json: final_{key}


def atomic_save(path: Path, obj) -> None:
    """Write a temp file, then rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=2))
    else:
        torch.save(obj, tmp)
    tmp.replace(path)


def log_scalars(writer: Optional[SummaryWriter], scalars: dict, step: int, last_checkpoint: Optional[Path],
                where: str = "update") -> None:
    """Write scalars to TensorBoard, stopping at the first NaN/inf loss or penalty instead of training a silent NaN
    policy."""
    for name, value in scalars.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite {name} ({value}) at {where} {step}; stopping. Last checkpoint: "
                                     f"{last_checkpoint or 'none'}")
        if writer is not None:
            writer.add_scalar(name, value, step)


def load_dynamics(path: str, model: EnsembleDynamics, env_id: str) -> dict:
    """Load a saved ensemble after checking it fits this dataset and these flags; returns its training stats."""
    file = Path(path) / "dynamics.pt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--dynamics-path {path}: no such file; pass a run folder or its dynamics.pt")
    saved = torch.load(file, map_location="cpu", weights_only=True)
    saved_config = {"spectral_norm": False, **saved["config"]}  # files from before --spectral-norm lack the key
    wrong = [f"{k} {saved_config.get(k)} in the file vs {v} here" for k, v in model.config.items()
             if saved_config.get(k) != v]
    if wrong:
        raise ValueError(f"--dynamics-path {file} does not fit this run ({'; '.join(wrong)}); pass the flags it was "
                         f"trained with (--num-ensemble, --num-elites, --dynamics-hidden-dim, --spectral-norm) or "
                         f"train a new one")
    if saved["env_id"] != env_id:
        print(f"note: {file} was trained on {saved['env_id']}, this run is {env_id}")
    model.load_state_dict(saved["state_dict"])
    return saved["stats"]


def read_checkpoint(args: Args) -> tuple[Args, Optional[dict]]:
    """--resume: the checkpoint, and the settings the run started with (a resumed run keeps them; others are named
    and ignored)."""
    if args.resume is None:
        return args, None
    path = Path(args.resume) / "checkpoint.pt" if Path(args.resume).is_dir() else Path(args.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no checkpoint there; pass a run folder or its checkpoint.pt")
    ckpt = {"phase": "policy", **torch.load(path, map_location="cpu", weights_only=False), "run_dir": path.parent}
    saved, defaults = Args(**ckpt["args"]), Args()
    ignored = [k for k, v in asdict(args).items()
               if k != "resume" and v != getattr(defaults, k) and v != getattr(saved, k)]
    if ignored:
        print(f"--resume: ignoring {ignored}; a resumed run keeps the settings it started with")
    return Args(**{**ckpt["args"], "resume": args.resume}), ckpt


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_dynamics_training(run_dir: Path, args: Args, fingerprint: list, dynamics: EnsembleDynamics,
                           device: torch.device, training: dict, stop: bool) -> None:
    """During model learning, checkpoint.pt holds the ensemble, the whole state of `train_dynamics` and every RNG;
    on a SIGTERM (stop) the run ends there."""
    atomic_save(run_dir / "checkpoint.pt", {"phase": "dynamics", "args": asdict(args), "data_fingerprint": fingerprint,
                                            "dynamics": dynamics.state_dict(), "training": training,
                                            "rng": rng_state(device)})
    if stop:
        preempted(run_dir, f"dynamics epoch {training['epoch'] + 1}")


def save_policy_training(run_dir: Path, args: Args, fingerprint: list, modules: dict, log_alpha,
                         model_buffer: ReplayBuffer, device: torch.device, results: dict, step: int) -> None:
    """During policy learning, checkpoint.pt holds weights, optimizer states, α, the model buffer, every RNG, the
    update counter and the evaluation history: enough to continue bit for bit (CPU)."""
    atomic_save(run_dir / "checkpoint.pt", {
        "phase": "policy", "step": step, "args": asdict(args), "results": results, "data_fingerprint": fingerprint,
        **{k: v.state_dict() for k, v in modules.items()}, "log_alpha": log_alpha.detach(),
        "model_buffer": (model_buffer.data[: model_buffer.size], model_buffer.ptr, model_buffer.size),
        "rng": rng_state(device)})


def restore(ckpt: dict, modules: dict, log_alpha, model_buffer: ReplayBuffer, device: torch.device) -> None:
    """The inverse of `save_policy_training`, in place (before any CUDA graph is captured over these tensors)."""
    for k, v in modules.items():
        v.load_state_dict(ckpt[k])
    with torch.no_grad():
        log_alpha.copy_(ckpt["log_alpha"])
    rows, model_buffer.ptr, model_buffer.size = ckpt["model_buffer"]
    model_buffer.data[: len(rows)] = rows.to(device)
    model_buffer.count.fill_(model_buffer.size)
    set_rng_state(ckpt["rng"], device)
    print(f"resumed {ckpt['run_dir']} at update {ckpt['step']}")


def preempted(run_dir: Path, where: str):
    print(f"SIGTERM: checkpoint at {where} in {run_dir / 'checkpoint.pt'}; continue with --resume {run_dir}")
    raise SystemExit(143)


def rollout_length_and_lam(args: Args, task: Task) -> tuple[int, float]:
    """h and λ: the flags, else the task's published setting (D15); both printed with where they came from."""
    default_h, default_lam = TASK_DEFAULTS.get(task.dataset, {}).get(task.family, OTHER_TASK_DEFAULT)
    h = args.rollout_length if args.rollout_length is not None else default_h
    lam = args.lam if args.lam is not None else default_lam
    print(f"{args.env_id}: h = {h} ({'--rollout-length' if args.rollout_length is not None else 'task default'}), "
          f"λ = {lam} ({'--lam' if args.lam is not None else 'task default'}), penalty = {args.penalty}")
    return h, lam


def load_real_data(task: Task, args: Args, env: gym.Env, device: torch.device, ckpt: Optional[dict]):
    """The dataset as the real replay buffer on the training device (its one copy), and its fingerprint
    [rows, reward sum], which a resumed run must match."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    data = get_dataset(task, args.dataset_path, obs_dim, act_dim)
    fingerprint = [len(data["rewards"]), float(data["rewards"].sum(dtype=np.float64))]
    if ckpt is not None and ckpt["data_fingerprint"] != fingerprint:
        raise ValueError(f"the dataset changed since the checkpoint ({ckpt['data_fingerprint']} vs {fingerprint} as "
                         f"[rows, reward sum]); resume needs the same data")
    real = ReplayBuffer(fingerprint[0], obs_dim, act_dim, device)
    real.add(to_rows(*(torch.as_tensor(data[k], device=device) for k in
                       ("observations", "actions", "rewards", "next_observations", "terminals"))))
    print(f"dataset: {real.size} transitions, obs_dim {obs_dim}, act_dim {act_dim}, device {device}")
    return real, fingerprint


def make_sac(env: gym.Env, args: Args, device: torch.device, capturable: bool):
    """Actor, twin critics, their frozen targets, log α, and an Adam for each (D13)."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = Actor(obs_dim, act_dim, env.action_space.low, env.action_space.high).to(device)
    qf, qf_target = TwinQ(obs_dim, act_dim).to(device), TwinQ(obs_dim, act_dim).to(device)
    qf_target.load_state_dict(qf.state_dict())
    qf_target.requires_grad_(False)
    log_alpha = torch.full((), math.log(args.alpha), device=device, requires_grad=True)
    q_opt = adam(qf.parameters(), args.q_lr, device, capturable)
    actor_opt = adam(actor.parameters(), args.policy_lr, device, capturable)
    return actor, qf, qf_target, log_alpha, q_opt, actor_opt, adam([log_alpha], args.alpha_lr, device, capturable)


def make_writer(args: Args, run_dir: Path, purge_step: Optional[int]) -> SummaryWriter:
    """TensorBoard in the run folder (x-axis: gradient updates), mirrored to wandb with --track."""
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, name=run_dir.name,
                   config=vars(args), id=run_dir.name.replace("/", "-"), resume="allow", save_code=True)
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def main(args: Args) -> dict:
    sigterm = []  # a scheduler's SIGTERM (preemption, time limit) or Ctrl-C, from the start: checkpoint, exit 143
    previous = {s: signal.signal(s, lambda signum, _: sigterm.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        args, ckpt = read_checkpoint(args)
        check_args(args)
        task = make_task(args.env_id)
        h, lam = rollout_length_and_lam(args, task)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        device = pick_device(args)
        graph = args.cuda_graph and device.type == "cuda"
        env = make_env(task)
        real, fingerprint = load_real_data(task, args, env, device, ckpt)
        dynamics = EnsembleDynamics(*real.fields[:2], args.num_ensemble, args.num_elites, args.dynamics_hidden_dim,
                                    args.spectral_norm).to(device)
        if ckpt is None and args.dynamics_path is not None:  # checked before a run folder exists
            dyn_stats = load_dynamics(args.dynamics_path, dynamics, args.env_id)
        run_dir = ckpt["run_dir"] if ckpt is not None else Path("runs") / (f"{args.env_id}__{args.exp_name}__"
                                                                            f"{args.seed}__{int(time.time())}")
        run_dir.mkdir(parents=True, exist_ok=ckpt is not None)  # never write into another run's folder
        resumed = ckpt is not None and ckpt["phase"] == "policy"
        start_step = ckpt["step"] if resumed else 0
        # a resumed run's TensorBoard drops what was logged after its checkpoint (dynamics: per model epoch)
        writer = make_writer(args, run_dir, start_step if resumed else ckpt and ckpt["training"]["epoch"] + 1)

        # Model learning (Alg. 2, line 1): independent of λ, h and SAC, so it can be trained once and reused
        if resumed:
            dyn_stats = ckpt["results"]["dynamics"]  # its weights come back with the rest of the run in `restore`
        else:
            if ckpt is not None:  # a run stopped during model training
                dynamics.load_state_dict(ckpt["dynamics"])
                set_rng_state(ckpt["rng"], device)
            if args.dynamics_path is None:
                save = partial(save_dynamics_training, run_dir, args, fingerprint, dynamics, device)
                dyn_stats = train_dynamics(dynamics, *make_model_data(real), args, writer, ckpt and ckpt["training"],
                                           save, sigterm)
            atomic_save(run_dir / "dynamics.pt", {"state_dict": dynamics.state_dict(), "config": dynamics.config,
                                                  "env_id": args.env_id, "stats": dyn_stats})
        print(f"dynamics: {dyn_stats['epochs']} epochs, holdout MSE {dyn_stats['holdout_mse']:.4g} "
              f"(elites {dyn_stats['elite_holdout_mse']:.4g})")
        dynamics.eval()  # only predictions from here on: rollouts and the gauge keep D16's exact σ

        # Policy optimization on the penalized MDP (Alg. 2, lines 2-9)
        actor, qf, qf_target, log_alpha, q_opt, actor_opt, alpha_opt = sac = make_sac(env, args, device, graph)
        modules = {"dynamics": dynamics, "actor": actor, "qf": qf, "qf_target": qf_target, "q_opt": q_opt,
                   "actor_opt": actor_opt, "alpha_opt": alpha_opt}
        model_rows = args.model_retain_epochs * args.rollout_batch_size * h if args.real_ratio < 1 else 1  # D9, D10
        model_buffer = ReplayBuffer(model_rows, *real.fields[:2], device)
        termination_fn = TERMINATION_FNS[task.family]
        results = ckpt["results"] if resumed else {
            "env_id": args.env_id, "seed": args.seed, "lam": lam, "rollout_length": h, "run_name": run_dir.name,
            "dynamics": dyn_stats, **{f"final_{k}": None for k in RESULT_KEYS}, "evaluations": [],
            "args": asdict(replace(args, resume=None))}  # the settings, not the --resume that continued them
        save = partial(save_policy_training, run_dir, args, fingerprint, modules, log_alpha, model_buffer, device,
                       results)
        if resumed:
            restore(ckpt, modules, log_alpha, model_buffer, device)
        else:
            save(step=0)
        evaluator = Evaluator(task, args, actor, dynamics, lam, graph, writer, results, run_dir)  # D14, D17, D18

        def update() -> dict:  # Alg. 2, line 8: one SAC step on a batch of real and model rows (D10)
            batch = real.split(sample_mixed(real, model_buffer, args.batch_size, args.real_ratio))
            return sac_update(batch, *sac, args)
        if graph:  # the same update, recorded once and replayed (H200: 0.60 ms vs 6.33 ms eager, benchmarks/speed.py)
            update = cuda_graph(update)
        total_updates, start_time = args.epochs * args.steps_per_epoch, time.time()
        bar = tqdm(total=total_updates, initial=start_step, desc="MOPO", unit="upd", disable=None)  # a terminal only
        for step in range(start_step, total_updates):
            global_step = step + 1
            if step % args.rollout_freq == 0 and args.real_ratio < 1.0:  # D10: no model data needed at real_ratio 1
                start_obs = real.split(real.sample(args.rollout_batch_size))[0]
                rows, stats = rollout(actor, dynamics, start_obs, h, lam, args.penalty, termination_fn)
                model_buffer.add(rows)
                log_scalars(writer, {f"rollout/{k}": v.item() for k, v in stats.items()} | {
                    "rollout/transitions": len(rows), "rollout/model_buffer_size": model_buffer.size},
                    global_step, run_dir / "checkpoint.pt")
            info = update()
            epoch, end_of_epoch = divmod(global_step, args.steps_per_epoch)
            checkpoint_now = (end_of_epoch == 0 and epoch % args.checkpoint_freq == 0) or bool(sigterm)
            if global_step % args.log_freq == 0 or checkpoint_now:  # the only host syncs of the update loop
                sps = int((global_step - start_step) / (time.time() - start_time))
                log_scalars(writer, {k: float(v) for k, v in info.items()} | {"charts/SPS": sps}, global_step,
                            run_dir / "checkpoint.pt")
                bar.update(global_step - bar.n)
            if end_of_epoch == 0 and (epoch % args.eval_freq == 0 or epoch == args.epochs):
                evaluator.record()  # the last one, done meanwhile (D18)
                evaluator.start(epoch, global_step)
            if checkpoint_now:
                evaluator.record()
                save(step=global_step)
            if sigterm:
                writer.close()
                preempted(run_dir, f"update {global_step}")
        bar.update(total_updates - bar.n)
        bar.close()
        evaluator.record()

        if args.save_model:
            atomic_save(run_dir / "model.pt", {k: v.state_dict() for k, v in modules.items() if "opt" not in k}
                        | {"log_alpha": log_alpha.detach()})
        save(step=total_updates)
        atomic_save(run_dir / "results.json", results)
        print(f"done in {time.time() - start_time:.0f} s: {run_dir / 'results.json'}")
        for resource in (evaluator, env, writer):
            resource.close()
        if args.track:  # the wandb run that make_writer started
            sys.modules["wandb"].finish()
        return results
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (ValueError, OSError, ImportError, FloatingPointError) as e:  # bad input or numbers: one line
        raise SystemExit(f"error: {e}")
