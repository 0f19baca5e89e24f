"""MOPO: Model-based Offline Policy Optimization, in one file.

Yu, Thomas, Yu, Ermon, Zou, Levine, Finn, Ma. NeurIPS 2020. arXiv:2005.13239 (v2), whose numbering is cited below;
"authors' code" is github.com/tianheyu927/mopo.

    python mopo.py --env-id hopper-medium-v2                       # the task's published (h, λ)
    python mopo.py --env-id hopper-medium-v2 --lam 1.0 --rollout-length 5

Sections: 1 Args · 2 Data · 3 Termination functions · 4 Ensemble dynamics · 5 MOPO: penalty and rollouts · 6 SAC ·
7 Evaluation · 8 main. Implementation details, the choices the paper leaves open (README: sources, reasons):
D1  Model targets [r, Δs = s' − s], reward first (authors'); inputs [s, a] z-scored on the training split.
D2  7 members, 4 hidden layers of 200 swish, mean and log-variance heads (authors' D4RL configs).
D3  Learnable log-variance bounds (0.5, −10), soft-clamped; loss + 0.01·(Σmax − Σmin) (authors').
D4  Each member's Gaussian NLL, summed; the authors' per-layer L2 as Adam's weight decay (same gradient).
D5  Holdout min(20%, 1000); a bootstrap per member; snapshots on > 1% gains; 5 stale epochs stop; 5 elites.
D6  Penalty u(s, a) = max over ALL members of ‖σ_i(s, a)‖₂, reward dim included; `ensemble-std`: disagreement.
D7  Each transition from a random elite, (r, Δs) = μ + σ·ε; SAC gets the sampled r − λ·u (authors'; paper: mean).
D8  Every rollout_freq updates: rollout_batch_size dataset states, the current policy, h steps, stop at done.
D9  Model buffer: a FIFO of model_retain_epochs × rollout_batch_size × h rows.
D10 SAC batches: int(real_ratio·B) real rows, then model rows; real_ratio 1: SAC on the data, no rollouts.
D11 MBPO/MOPO's termination functions, tested against gymnasium; hopper's abs() bug fixed.
D12 next_observations from the file; timeouts are not terminals; the whole dataset is kept.
D13 SAC as softlearning (2×256, lr 3e-4, α tuned to entropy −3); critic, actor, α stepped in turn.
D14 Deterministic episodes in gymnasium -v4 (ant: contact forces zeroed, as in D4RL's data); score each.
D15 Per-task (h, λ): OfflineRL-Kit's -v2 settings, the authors' -v0 ones for random data, ours elsewhere.
D16 --spectral-norm (off): the paper's Lipschitz-regularized model, never in the authors' code.
D17 The gauge (Thm. 4.4, ours): each evaluation's policy also runs in the model: raw and penalized returns.
D18 Thm. 4.4's bound broken (ours): per episode, penalized model − real return > 0: mean by 2 s.e., or all.
"""

import copy
import http.client
import importlib
import json
import math
import os
import random
import signal
import sys
import time
import urllib.request
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional

import gymnasium as gym
import h5py
import mujoco
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
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """a torch device (cpu, cuda, cuda:1); auto: CUDA if torch sees it"""
    cuda_graph: bool = True
    """on CUDA, replay the SAC update, model training step and gauge as CUDA graphs"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases"""
    wandb_project_name: str = "mopo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    save_model: bool = False
    """if toggled, save SAC's networks and α to `runs/{run_name}/model.pt`"""
    checkpoint_freq: int = 10
    """write `runs/{run_name}/checkpoint.pt` every this many epochs (and on SIGTERM, Ctrl-C)"""
    resume: Optional[str] = None
    """continue a run (its folder or checkpoint.pt) with its own settings"""

    # data
    env_id: str = "hopper-medium-v2"
    """D4RL task ({halfcheetah,hopper,walker2d,ant}-{random,medium,medium-replay,medium-expert,expert,full-replay}-v2),
    a Minari id (mujoco/hopper/medium-v0), or with --dataset-path a gymnasium MuJoCo id (raw returns)"""
    dataset_path: Optional[str] = None
    """a local hdf5 in D4RL layout; `--env-id` still names the task"""

    # dynamics ensemble (D2-D5)
    num_ensemble: int = 7
    """number of ensemble members"""
    num_elites: int = 5
    """number of elites, which sample model transitions"""
    dynamics_hidden_dim: int = 200
    """width of the 4 hidden layers of each member"""
    dynamics_lr: float = 1e-3
    """Adam learning rate of the dynamics ensemble"""
    dynamics_batch_size: int = 256
    """dynamics minibatch size per member"""
    holdout_size: int = 1000
    """transitions held out for early stopping (at most 20%)"""
    dynamics_max_epochs: Optional[int] = None
    """cap on dynamics training epochs (default: until early stopping)"""
    dynamics_path: Optional[str] = None
    """reuse a trained ensemble (a run folder or its dynamics.pt)"""
    spectral_norm: bool = False
    """the paper's Lipschitz-regularized model (D16)"""

    # MOPO (Alg. 2)
    lam: Optional[float] = None
    """λ, the penalty coefficient (default: the task's published value)"""
    rollout_length: Optional[int] = None
    """h, the model rollout horizon (default: the task's published value)"""
    rollout_batch_size: int = 50_000
    """start states per rollout round"""
    rollout_freq: int = 1000
    """gradient updates between rollout rounds"""
    model_retain_epochs: int = 5
    """rollout rounds the FIFO model buffer holds"""
    real_ratio: float = 0.05
    """share of real transitions in each SAC batch"""
    penalty: Literal["aleatoric", "ensemble-std"] = "aleatoric"
    """u(s,a): `aleatoric` = max_i ‖σ_i‖ (paper); `ensemble-std` = max_i ‖μ_i − mean μ‖"""

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
    """α when `--no-autotune`, else its initial value"""
    target_entropy: float = -3.0
    """target entropy H̄ for autotuning (authors': −3 for every task)"""

    # schedule and evaluation
    epochs: int = 1000
    """training epochs (0: only train and save the dynamics)"""
    steps_per_epoch: int = 1000
    """gradient updates per epoch"""
    eval_freq: int = 5
    """evaluate every this many epochs and after the last"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per evaluation"""
    gauge: bool = True
    """also run each evaluation's policy in the learned model (D17)"""
    log_freq: int = 1000
    """log losses every this many gradient updates"""


# === 2. Data: D4RL tasks, download and cache, replay buffers ===
# family: (evaluation env, its kwargs, D4RL's reference min and max returns)
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
# Ours: expert as medium-expert, full-replay as medium-replay; other tasks h 5 and a middle λ.
TASK_DEFAULTS |= {"expert": TASK_DEFAULTS["medium-expert"], "full-replay": TASK_DEFAULTS["medium-replay"]}
OTHER_TASK_DEFAULT = (5, 1.0)
DATA_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")  # a row: [s, a, r, s', done]


@dataclass
class Task:
    env_id: str
    family: str  # picks the termination function
    dataset: Optional[str]  # picks (h, λ)
    gym_id: str  # the evaluation env
    gym_kwargs: dict
    ref_min: Optional[float] = None  # reference returns, where they exist
    ref_max: Optional[float] = None
    file_name: Optional[str] = None  # D4RL's
    minari_id: Optional[str] = None


def make_task(env_id: str) -> Task:
    if "/" in env_id:
        return minari_task(env_id)
    module, _, name = env_id.rpartition(":")
    if module:  # gymnasium's `module:EnvId`: the module registers the env (benchmarks/ood_tasks.py)
        importlib.import_module(module)
    if name in gym.registry and (family := name.split("-")[0].lower()) in TERMINATION_FNS:  # no reference scores
        return Task(env_id, family, None, env_id, {})
    family, _, rest = env_id.partition("-")
    dataset = rest.removesuffix("-v2") if rest.endswith("-v2") else None
    if family not in D4RL_FAMILIES or dataset not in D4RL_DATASETS:
        raise ValueError(f"unknown --env-id {env_id!r}; valid D4RL ids: {{{','.join(D4RL_FAMILIES)}}}-"
                         f"{{{','.join(D4RL_DATASETS)}}}-v2, Minari ids, or with --dataset-path e.g. Hopper-v4")
    gym_id, gym_kwargs, ref_min, ref_max = D4RL_FAMILIES[family]
    file_name = f"{family}_{dataset.replace('-', '_')}-v2.hdf5"  # d4rl's name: its cache is reused
    return Task(env_id, family, dataset, gym_id, gym_kwargs, ref_min, ref_max, file_name)


def minari_task(env_id: str) -> Task:
    try:
        import minari

        dataset = minari.load_dataset(env_id, download=True)
    except ImportError as e:
        raise ImportError(f"--env-id {env_id} is a Minari dataset: pip install 'minari[hdf5]' pillow") from e
    except Exception as e:  # minari raises several kinds offline or for an unknown id
        raise ConnectionError(f"could not load Minari dataset {env_id} ({e}); check the id") from e
    spec, meta = dataset.recover_environment(eval_env=True).spec, dataset.storage.metadata
    if (family := spec.id.split("-")[0].lower()) not in TERMINATION_FNS:
        raise ValueError(f"{env_id} runs in {spec.id}, which has no termination function here")
    return Task(env_id, family, env_id.rsplit("/", 1)[-1].rsplit("-v", 1)[0], spec.id,
                {**spec.kwargs, "max_episode_steps": spec.max_episode_steps}, meta.get("ref_min_score"),
                meta.get("ref_max_score"), minari_id=env_id)


def download(url: str, path: Path) -> Path:
    """One attempt into a .part file of this process, returned; a failure or an interruption leaves nothing."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")  # two runs filling one cache write apart
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            with Progress(f"download {part.name}", size, "B") as progress:
                while chunk := response.read(1 << 20):
                    progress.update(f.write(chunk))
        if size is not None and part.stat().st_size != size:
            raise OSError(f"the connection closed after {part.stat().st_size} of {size} bytes")
    except BaseException as e:  # a network error, Ctrl-C or SIGTERM: no file left behind
        part.unlink(missing_ok=True)
        if isinstance(e, (OSError, http.client.HTTPException)):
            raise ConnectionError(f"could not download {url} ({e!r}); run again, place the file at {path} by hand, "
                                  f"or pass --dataset-path") from e
        raise
    return part


def load_dataset(path: Path, obs_dim: int, act_dim: int) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist; check --dataset-path")
    try:
        with h5py.File(path, "r") as f:
            return check_dataset({k: f[k][()] for k in DATA_KEYS if k in f}, path, obs_dim, act_dim)
    except OSError as e:
        raise ValueError(f"{path} is not a readable hdf5 file ({e})") from None


def check_dataset(data: dict, source, obs_dim: int, act_dim: int) -> dict:
    """D12: every key, a row per transition, the env's dimensions, finite values."""
    if missing := [k for k in DATA_KEYS if k not in data]:
        raise ValueError(f"{source} lacks key(s) {missing}; a D4RL-layout file needs {list(DATA_KEYS)}")
    n = len(data["observations"])
    for key, shape in zip(DATA_KEYS, [(n, obs_dim), (n, act_dim), (n,), (n, obs_dim), (n,)]):
        value = np.asarray(data[key], dtype=np.float32)
        data[key] = value.reshape(len(value), -1).squeeze(-1) if len(shape) == 1 else value  # [N, 1] → [N]
        if data[key].shape != shape:
            raise ValueError(f"{source}: {key} has shape {data[key].shape}, expected {shape} (a row per transition, "
                             f"this env's dims); does --env-id match the data?")
        if not np.isfinite(data[key]).all():
            raise ValueError(f"{source}: {key} holds NaN or inf values; clean the dataset first")
    return {k: data[k] for k in DATA_KEYS}


def get_dataset(task: Task, dataset_path: Optional[str], obs_dim: int, act_dim: int) -> dict:
    if dataset_path is not None:
        return load_dataset(Path(dataset_path), obs_dim, act_dim)
    if task.minari_id is not None:
        import minari

        eps = minari.load_dataset(task.minari_id).iterate_episodes()
        fields = [(e.observations[:-1], e.actions, e.rewards, e.observations[1:], e.terminations) for e in eps]
        data = {k: np.concatenate(column) for k, column in zip(DATA_KEYS, zip(*fields))}  # each over all episodes
        return check_dataset(data, task.env_id, obs_dim, act_dim)
    if task.file_name is None:
        raise ValueError(f"--env-id {task.env_id} is not a D4RL task, so it needs --dataset-path")
    path = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser() / task.file_name  # d4rl's cache
    if path.exists():
        try:
            return load_dataset(path, obs_dim, act_dim)
        except ValueError as e:  # never train on a damaged cache entry
            raise ValueError(f"{e}; the cached file is damaged: rm {path} and run again to download it") from None
    url = D4RL_URL.format(file=task.file_name)
    part = download(url, path)
    try:
        data = load_dataset(part, obs_dim, act_dim)
    except ValueError as e:
        part.unlink()
        raise ValueError(f"downloaded {url}, but it is not a valid D4RL file ({e}); deleted it: run again") from None
    part.replace(path)
    return data


class ReplayBuffer:
    """Rows [s, a, r, s', done] on the training device, FIFO once full (D9); sampling reads the fill level from the
    device, so a recorded CUDA graph reaches rows added later."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.fields = (obs_dim, act_dim, 1, obs_dim, 1)
        self.data = torch.zeros(capacity, sum(self.fields), device=device)
        self.capacity, self.ptr, self.size = capacity, 0, 0
        self.count = torch.zeros((), dtype=torch.long, device=device)  # = size

    def add(self, rows: torch.Tensor) -> None:
        rows = rows[-self.capacity:]  # [n, width]
        n = len(rows)
        first = min(n, self.capacity - self.ptr)  # rows before the end; the rest wrap to the front
        self.data[self.ptr: self.ptr + first] = rows[:first]  # in place, where a graph reads
        self.data[: n - first] = rows[first:]
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)
        self.count.fill_(self.size)

    def sample(self, n: int) -> torch.Tensor:
        return self.data[torch.randint(2**62, (n,), device=self.data.device) % self.count]  # [n, width]

    def split(self, rows: torch.Tensor):
        obs, act, rew, next_obs, done = rows.split(self.fields, dim=1)
        return obs, act, rew.squeeze(1), next_obs, done.squeeze(1)  # rew, done: [n]

    def state_dict(self) -> dict:
        return {"rows": self.data[: self.size].clone(), "ptr": self.ptr}  # a view would save every row's storage

    def load_state_dict(self, state: dict) -> None:  # into this empty buffer
        self.add(state["rows"].to(self.data.device))
        self.ptr = state["ptr"]


def to_rows(obs, act, rew, next_obs, done) -> torch.Tensor:
    return torch.cat([obs, act, rew[:, None], next_obs, done[:, None].float()], dim=1)


def sample_mixed(real: ReplayBuffer, model: ReplayBuffer, batch_size: int, real_ratio: float) -> torch.Tensor:
    """D10: int(real_ratio·B) real rows, then model rows."""
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
    return next_obs.new_zeros(len(next_obs), dtype=torch.bool)


def ant_done(obs, act, next_obs):
    height = next_obs[:, 0]
    return ~(torch.isfinite(next_obs).all(1) & (height >= 0.2) & (height <= 1.0))


def invertedpendulum_done(obs, act, next_obs):  # the pole's angle leaves ±0.2 rad
    return ~(torch.isfinite(next_obs).all(1) & (next_obs[:, 1].abs() <= 0.2))


TERMINATION_FNS: dict[str, Callable] = {
    "hopper": hopper_done, "walker2d": walker2d_done, "halfcheetah": halfcheetah_done, "ant": ant_done,
    "invertedpendulum": invertedpendulum_done,
}


# === 4. Ensemble dynamics p̂(s', r | s, a) (Sec. 4.3, the authors' BNN) ===
class EnsembleLinear(nn.Module):
    """E linear layers as one batched matmul: [E, B, in] → [E, B, out]."""

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
        """W / σ_max(W) (Miyato et al. 2018): σ = vᵀWu, one power-iteration step per training forward."""
        with torch.no_grad():
            v = F.normalize(torch.einsum("eio,eo->ei", self.weight, self.sn_u), dim=1)  # [E, in]
            if self.training:
                self.sn_u.copy_(F.normalize(torch.einsum("eio,ei->eo", self.weight, v), dim=1))  # [E, out]
                v = F.normalize(torch.einsum("eio,eo->ei", self.weight, self.sn_u), dim=1)
        sigma = torch.einsum("ei,eio,eo->e", v, self.weight, self.sn_u)  # [E], differentiable in W
        return self.weight / sigma[:, None, None]


class EnsembleDynamics(nn.Module):
    """(s, a) → each member's mean and log-variance of [r, Δs] (D1-D3)."""

    weight_decays = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4, 1e-4)  # D4: hidden layers 1..4, mean head, log-var head

    def __init__(self, obs_dim: int, act_dim: int, num_ensemble: int = 7, num_elites: int = 5, hidden_dim: int = 200,
                 spectral_norm: bool = False):
        super().__init__()
        self.config = {"obs_dim": obs_dim, "act_dim": act_dim, "num_ensemble": num_ensemble, "num_elites": num_elites,
                       "dynamics_hidden_dim": hidden_dim, "spectral_norm": spectral_norm}  # load_dynamics checks it
        in_dim, out_dim = obs_dim + act_dim, 1 + obs_dim
        dims = (in_dim, hidden_dim, hidden_dim, hidden_dim, hidden_dim)
        # D16: spectral norm on every layer but the log-variance head
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
        """obs, act: [B, ·] or [E, B, ·] → mean, logvar: [E, B, 1 + obs_dim]."""
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
    """Each member's Gaussian NLL without its constant, averaged: [E, B, D] → [E]."""
    return ((mean - target).pow(2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2))


def dynamics_loss(model: EnsembleDynamics, obs, act, target):
    """D4: NLL summed over members + the bound terms (L2: Adam's weight decay); inputs [E, B, ·]."""
    loss = gaussian_nll(*model(obs, act), target).sum()
    return loss + 0.01 * model.max_logvar.sum() - 0.01 * model.min_logvar.sum()


def dynamics_optimizer(model: EnsembleDynamics, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """D4: Adam whose weight decay is the gradient of each layer's 0.5·wd·Σw²."""
    groups = [{"params": [layer.weight], "weight_decay": wd} for layer, wd in zip(model.layers(), model.weight_decays)]
    rest = [p for p in model.parameters() if all(p is not g["params"][0] for g in groups)]
    return adam(groups + [{"params": rest}], lr, model.input_mean.device, capturable)


def adam(params, lr: float, device: torch.device, capturable: bool = False) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"), capturable=capturable)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A saved state under this run's flags: a checkpoint written on the CPU may resume as a CUDA graph's."""
    flags = [{k: g[k] for k in ("capturable", "fused")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state | {"param_groups": [g | f for g, f in zip(state["param_groups"], flags)]})


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def cuda_graph(fn: Callable) -> Callable:
    """Speed on a GPU, where these small networks are launch-bound: record fn, then replay it in one launch. fn may
    touch only tensors that stay in place; each call is one more call of fn (outputs overwritten)."""
    graph, side, outputs = torch.cuda.CUDAGraph(), torch.cuda.Stream(), []

    def call():
        if len(outputs) < 3:  # eager warm-ups on a side stream, as torch asks
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


@torch.no_grad()
def holdout_mse(model, obs, act, target):
    mean, _ = model(obs, act)  # [E, B, 1 + obs_dim]
    return (mean - target).pow(2).mean(dim=(1, 2))  # [E]


def select_elites(model: EnsembleDynamics, obs, act, target):
    """D5: the members of lowest holdout MSE are the elites."""
    mse = holdout_mse(model, obs, act, target)
    model.elites.copy_(mse.argsort()[: len(model.elites)])
    return mse


def model_data(real: ReplayBuffer) -> tuple:
    """D1: the model's inputs (s, a) and targets [r, Δs] from every real transition."""
    obs, act, rew, next_obs, _ = real.split(real.data[: real.size])
    return obs, act, torch.cat([rew[:, None], next_obs - obs], dim=1)


def shuffled(boot):
    return boot.gather(1, torch.rand(boot.shape, device=boot.device).argsort(dim=1))  # each member its own order


def start_training(model: EnsembleDynamics, obs, act, args) -> dict:
    """D5: holdout split, input statistics (D1), a bootstrap of the rest per member."""
    perm = torch.randperm(len(obs), device=obs.device)
    if (n_holdout := min(int(0.2 * len(obs)), args.holdout_size)) < 1:
        raise ValueError(f"{len(obs)} transitions are too few to hold any out for early stopping")
    hold, train = perm[:n_holdout], perm[n_holdout:]
    inputs = torch.cat([obs[train], act[train]], dim=1)
    model.input_mean.copy_(inputs.mean(0))
    std = inputs.std(0, unbiased=False)  # np.std, as the authors' scaler
    model.input_std.copy_(torch.where(std < 1e-12, torch.ones_like(std), std))
    boot = train[torch.randint(len(train), (args.num_ensemble, len(train)), device=obs.device)]  # [E, N]
    return {"epoch": 0, "epochs_since_update": 0, "hold": hold, "best": obs.new_full((args.num_ensemble,), 1e10),
            "boot": shuffled(boot)}


def train_dynamics(model: EnsembleDynamics, data: tuple, args, writer=None, state=None, on_epoch=None) -> dict:
    """D5 on data = (s, a, [r, Δs]). `on_epoch(state)` may checkpoint after each epoch; given back as `state`,
    training ends with the ensemble it would have reached (CPU)."""
    obs, act, target = data
    B, graph = args.dynamics_batch_size, getattr(args, "cuda_graph", False) and obs.is_cuda
    optimizer = dynamics_optimizer(model, args.dynamics_lr, capturable=graph)
    member_params = [p for layer in model.layers() for p in (layer.weight, layer.bias)]  # ensemble axis first
    if state is None:
        state = start_training(model, obs, act, args) | {"snapshot": [p.detach().clone() for p in member_params]}
    else:  # a checkpoint's, loaded on the CPU
        state = {k: [x.to(obs.device) for x in v] if k == "snapshot" else v.to(obs.device) if torch.is_tensor(v)
                 else v for k, v in state.items()}
        load_optimizer(optimizer, state.pop("optimizer"))
    hold, n_batches = state["hold"], -(-state["boot"].shape[1] // B)

    def fit(idx):  # one Adam step; idx [E, B]: each member its own bootstrap rows
        loss = dynamics_loss(model, obs[idx], act[idx], target[idx])
        step(optimizer, loss)
        return loss.detach()
    batch_idx = state["boot"][:, :B].clone()  # the CUDA graph's input, refilled before each replay
    fit_graph = cuda_graph(lambda: fit(batch_idx)) if graph else None
    progress = Progress("dynamics", args.dynamics_max_epochs, "epoch", state["epoch"])
    while True:
        loss_sum = obs.new_zeros(())
        for b in range(0, state["boot"].shape[1], B):
            idx = state["boot"][:, b: b + B]  # [E, ≤B]
            if graph and idx.shape[1] == B:
                batch_idx.copy_(idx)
                loss_sum += fit_graph()
            else:  # CPU, or the last, shorter minibatch
                loss_sum += fit(idx)
            progress.update(0)
        state["epoch"] += 1
        mse = holdout_mse(model, obs[hold], act[hold], target[hold])  # [E]
        improved = (state["best"] - mse) / state["best"] > 0.01
        state["best"] = torch.where(improved, mse, state["best"])
        for p, s in zip(member_params, state["snapshot"]):
            s[improved] = p.detach()[improved]
        state["epochs_since_update"] = 0 if improved.any() else state["epochs_since_update"] + 1
        scalars = {"dynamics/train_loss": loss_sum.item() / n_batches, "dynamics/holdout_mse": mse.mean().item()}
        log_scalars(writer, scalars, state["epoch"], "dynamics epoch")
        progress.set_postfix(holdout_mse=f"{scalars['dynamics/holdout_mse']:.4g}", refresh=False)
        progress.update(1)
        if state["epochs_since_update"] > 5 or state["epoch"] == args.dynamics_max_epochs:
            break
        state["boot"] = shuffled(state["boot"])  # the next epoch's order, drawn before the checkpoint
        if on_epoch is not None:
            on_epoch(state | {"optimizer": optimizer.state_dict()})
    progress.close()
    with torch.no_grad():
        for p, s in zip(member_params, state["snapshot"]):
            p.copy_(s)
        for layer in model.layers():  # D16: exact σ for the restored weights
            if layer.spectral_norm:
                layer.sn_u.copy_(torch.linalg.svd(layer.weight, full_matrices=False).Vh[:, 0])  # [E, out]
    mse = select_elites(model, obs[hold], act[hold], target[hold])
    stats = {"epochs": state["epoch"], "holdout_mse": mse.mean().item(), "member_holdout_mse": mse.tolist(),
             "elite_holdout_mse": mse[model.elites].mean().item()}
    log_scalars(writer, {"dynamics/epochs": stats["epochs"], "dynamics/elite_holdout_mse": stats["elite_holdout_mse"]},
                0, "the end of dynamics training, step")
    return stats


# === 5. MOPO: uncertainty-penalized model rollouts (Alg. 2) ===
ROLLOUT_CHUNK_CPU = 1024  # CPU rollouts in chunks: [E, chunk, 200] activations stay in cache


def penalty(mean, logvar, kind: str = "aleatoric"):
    """u(s, a) [B] from every member's prediction; mean, logvar: [E, B, 1 + obs_dim] (D6)."""
    if kind == "aleatoric":
        return logvar.mul(0.5).exp().norm(dim=-1).amax(dim=0)  # Sec. 4.3: max_i ‖σ_i(s,a)‖
    if kind == "ensemble-std":
        delta = mean[..., 1:]  # [E, B, obs_dim]: the Δs dims
        return (delta - delta.mean(dim=0)).norm(dim=-1).amax(dim=0)
    raise ValueError(f"unknown penalty {kind!r}; use aleatoric or ensemble-std")


def model_step(model: EnsembleDynamics, obs, act, penalty_kind: str, termination_fn: Callable):
    """One model step from obs, act [B, ·]: sampled reward r [B], penalty u [B], s' [B, obs_dim], done [B] bool."""
    mean, logvar = model(obs, act)  # [E, B, 1 + obs_dim]
    u = penalty(mean, logvar, penalty_kind)  # [B]
    member = model.elites[torch.randint(len(model.elites), (len(obs),), device=obs.device)]  # D7
    row = torch.arange(len(obs), device=obs.device)
    mu, std = mean[member, row], logvar[member, row].mul(0.5).exp()  # [B, 1 + obs_dim]
    sample = mu + std * torch.randn(mu.shape, device=mu.device)
    rew, next_obs = sample[:, 0], obs + sample[:, 1:]
    done = termination_fn(obs, act, next_obs)  # [B] bool
    if not rew.shape == u.shape == done.shape == (len(obs),):
        raise ValueError(f"model step: reward {rew.shape}, penalty {u.shape}, done {done.shape}; not ({len(obs)},)")
    return rew, u, next_obs, done


@torch.no_grad()
def rollout(actor, step_fn: Callable, start_obs, rollout_length: int, lam: float, chunk_size: Optional[int] = None):
    """h-step branched rollouts in the penalized MDP from start_obs [B, obs_dim]; step_fn is `model_step` with its
    model, penalty and termination function bound. Returns rows [M ≤ B·h, width] and statistics."""
    rows, raw_rew, pen, terminal = [], [], [], []
    chunk_size = chunk_size or (ROLLOUT_CHUNK_CPU if start_obs.device.type == "cpu" else len(start_obs))
    for obs in start_obs.split(chunk_size):
        for _ in range(rollout_length):
            act, _ = actor.sample(obs)  # D8: the current stochastic policy
            rew, u, next_obs, done = step_fn(obs, act)
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
def model_returns(actor, step_fn: Callable, start_obs, horizon: int, lam: float, graph: bool = False) -> dict:
    """Thm. 4.4's gauge (D17): the deterministic policy's episodes in the model from start_obs [N, obs_dim] until
    `horizon`, termination or a non-finite step. Per episode [N]: Σ r (η of M̂), Σ (r − λ·u) (η of M̃, below the true
    return when λ·u bounds the model error), the length. `graph` (CUDA): each step replays a recorded graph."""
    obs = start_obs.clone()
    ret, penalized, length = (torch.zeros(len(obs), device=obs.device) for _ in range(3))
    alive = torch.ones(len(obs), dtype=torch.bool, device=obs.device)

    def one_step():  # in place, fixed shapes: a finished episode keeps stepping but earns nothing
        rew, u, next_obs, done = step_fn(obs, actor.act(obs))
        alive.logical_and_(torch.isfinite(next_obs).all(1) & torch.isfinite(rew - u))  # the model diverged: it ends
        ret.add_(torch.where(alive, rew, 0.0))
        penalized.add_(torch.where(alive, rew - lam * u, 0.0))
        length.add_(alive)
        alive.logical_and_(~done)
        obs.copy_(next_obs)
    run = cuda_graph(one_step) if graph else one_step
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
        low, high = (torch.as_tensor(bound, dtype=torch.float32) for bound in (action_low, action_high))
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

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(EnsembleLinear(2, obs_dim + act_dim, hidden_dim), nn.ReLU(),
                                 EnsembleLinear(2, hidden_dim, hidden_dim), nn.ReLU(), EnsembleLinear(2, hidden_dim, 1))

    def forward(self, obs, act):
        x = torch.cat([obs, act], dim=1).expand(2, -1, -1)  # [2, B, obs_dim + act_dim]
        return self.net(x).squeeze(-1)  # [2, B]


class SAC(nn.Module):
    """Actor, twin critics, their targets, log α: what checkpoints and --save-model hold."""

    def __init__(self, obs_dim: int, act_dim: int, action_space: gym.spaces.Box, alpha: float):
        super().__init__()
        self.actor = Actor(obs_dim, act_dim, action_space.low, action_space.high)
        self.qf, self.qf_target = TwinQ(obs_dim, act_dim), TwinQ(obs_dim, act_dim)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))


def sac_optimizers(sac: SAC, args: Args, device: torch.device, capturable: bool) -> dict:
    return {"q": adam(sac.qf.parameters(), args.q_lr, device, capturable),
            "actor": adam(sac.actor.parameters(), args.policy_lr, device, capturable),
            "alpha": adam([sac.log_alpha], args.alpha_lr, device, capturable)}


def soft_bellman_target(rew, done, next_q, next_log_prob, alpha, gamma):
    """y = r + γ·(1 − done)·(min_j Q'_j(s', a') − α·log π(a'|s')), all [B]: a terminal transition has no future."""
    if not (rew.shape == done.shape == next_q.shape == next_log_prob.shape and rew.dim() == 1):  # no silent [B, B]
        raise ValueError(f"Bellman target: reward, done, Q', log π' must all be [B]; got {rew.shape}, {done.shape}, "
                         f"{next_q.shape}, {next_log_prob.shape}")
    return rew + gamma * (1.0 - done) * (next_q - alpha * next_log_prob)


def sac_update(sac: SAC, opts: dict, batch: tuple, args: Args) -> dict:
    """One gradient step of critics, actor and α on one batch; returns detached tensors (no host sync)."""
    obs, act, rew, next_obs, done = batch
    alpha = sac.log_alpha.exp().detach() if args.autotune else args.alpha
    with torch.no_grad():
        next_act, next_log_prob = sac.actor.sample(next_obs)
        next_q = sac.qf_target(next_obs, next_act).min(dim=0).values  # [B]
        target = soft_bellman_target(rew, done, next_q, next_log_prob, alpha, args.gamma)
    q = sac.qf(obs, act)  # [2, B]
    q_loss = 0.5 * (q - target).pow(2).mean(dim=1).sum()  # each critic its own MSE, as separate optimizers would
    step(opts["q"], q_loss)

    sac.qf.requires_grad_(False)  # the actor's backward needs no critic weight gradients
    new_act, log_prob = sac.actor.sample(obs)
    actor_loss = (alpha * log_prob - sac.qf(obs, new_act).min(dim=0).values).mean()
    step(opts["actor"], actor_loss)
    sac.qf.requires_grad_(True)

    info = {"losses/q_loss": q_loss.detach(), "losses/actor_loss": actor_loss.detach(), "losses/alpha": alpha,
            "charts/q_mean": q.mean().detach(), "charts/entropy": -log_prob.mean().detach()}
    if args.autotune:
        alpha_loss = -(sac.log_alpha * (log_prob.detach() + args.target_entropy)).mean()
        step(opts["alpha"], alpha_loss)
        info["losses/alpha_loss"] = alpha_loss.detach()
    with torch.no_grad():  # Polyak averaging of the target critics, fused
        torch._foreach_lerp_(list(sac.qf_target.parameters()), list(sac.qf.parameters()), args.tau)
    return info


# === 7. Evaluation: deterministic episodes in gymnasium MuJoCo, D4RL normalized score per episode (D14) ===
def make_env(task: Task) -> gym.Env:
    """The task's env; MuJoCo's warnings go to Python's while it loads (so no MUJOCO_LOG.TXT)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(is out of date|settotalmass).*")  # -v4 XMLs, as D4RL's
        mujoco.set_mju_user_warning(warnings.warn)
        try:
            env = gym.make(task.gym_id, **task.gym_kwargs)
        finally:
            mujoco.set_mju_user_warning(None)
    if task.family == "ant" and task.file_name is not None:  # D14: D4RL's MuJoCo-2.0 ant saw no contact forces
        env = gym.wrappers.TransformObservation(
            env, lambda obs: np.concatenate([obs[:27], 0 * obs[27:]]), env.observation_space)
        env = gym.wrappers.TransformReward(env, lambda reward: reward + env.unwrapped.contact_cost)
    return env


def summarize(task: Task, episodes: dict) -> dict:
    """Mean and `_std` over episodes of each array and each episode's normalized score; with the gauge, D18."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in episodes.items()}
    if task.ref_min is not None:
        arrays["normalized_score"] = 100 * (arrays["return"] - task.ref_min) / (task.ref_max - task.ref_min)
    if "penalized_model_return" in arrays:  # D18: paired, one start state per episode
        arrays["bound_gap"] = arrays["penalized_model_return"] - arrays["return"]
    out = {k: float(v.mean()) for k, v in arrays.items()} | {f"{k}_std": float(v.std()) for k, v in arrays.items()}
    if (n := len(arrays.get("bound_gap", []))) > 1:
        over_noise = out["bound_gap"] > 2 * out["bound_gap_std"] / math.sqrt(n - 1)
        out["bound_broken"] = float(over_noise or (n >= 5 and bool((arrays["bound_gap"] > 0).all())))
    return out


@torch.no_grad()
def evaluate(actor: Actor, envs: gym.vector.VectorEnv, seed: int, gauge: Optional[Callable] = None) -> dict:
    """A deterministic episode per sub-env from envs.reset(seed), `actor` on the CPU (no GPU round trip per step).
    `gauge`: the model's episodes from the same states (D17), its noise from `seed`, training's RNG untouched."""
    obs, _ = envs.reset(seed=seed)
    returns, lengths, running = np.zeros(envs.num_envs), np.zeros(envs.num_envs), np.ones(envs.num_envs, dtype=bool)
    episodes = {}
    if gauge is not None:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
            torch.manual_seed(seed)
            episodes = {k: v.cpu() for k, v in gauge(torch.as_tensor(obs, dtype=torch.float32)).items()}
    while running.any():
        obs, reward, terminated, truncated, _ = envs.step(actor.act(torch.as_tensor(obs, dtype=torch.float32)).numpy())
        returns += reward * running  # a finished sub-env auto-resets; its later rewards are not counted
        lengths += running
        running &= ~(terminated | truncated)
    return {"return": returns, "length": lengths} | episodes


# === 8. main: load → train the model → {rollout, SAC update, evaluate, log, checkpoint} → save ===
RESULT_KEYS = ("return", "return_std", "normalized_score", "normalized_score_std")  # results.json: final_{key}


def check_args(args: Args) -> torch.device:
    """One clear line per bad flag, before anything is loaded; returns the device."""
    lowest = {"lam": 0, "epochs": 0} | {k: 1 for k in (
        "rollout_length", "dynamics_max_epochs", "num_ensemble", "num_elites", "batch_size", "dynamics_batch_size",
        "rollout_batch_size", "rollout_freq", "model_retain_epochs", "steps_per_epoch", "eval_freq", "eval_episodes",
        "log_freq", "holdout_size", "dynamics_hidden_dim", "checkpoint_freq")}
    for name, low in lowest.items():
        if (value := getattr(args, name)) is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for ok, message in [(0 <= args.real_ratio <= 1, f"--real-ratio must be in [0, 1], got {args.real_ratio}"),
                        (args.num_elites <= args.num_ensemble,
                         f"--num-elites must be <= --num-ensemble, got {args.num_elites} > {args.num_ensemble}"),
                        (0 <= args.gamma <= 1 and 0 < args.tau <= 1, "--gamma must be in [0, 1] and --tau in (0, 1]"),
                        (args.alpha > 0, f"--alpha must be > 0, got {args.alpha}")]:
        if not ok:
            raise ValueError(message)
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    try:
        device = torch.device(("cuda" if count["cuda"] else "cpu") if args.device == "auto" else args.device)
    except RuntimeError:
        device = None
    if device is None or (device.index or 0) >= count.get(device.type, 0):  # mps, xpu, cuda:N torch cannot use
        here = ", ".join(f"{t}:{i}" if t == "cuda" else t for t, n in count.items() for i in range(n))
        raise ValueError(f"--device {args.device!r}: torch cannot use it here; this machine has {here} (or auto)")
    if device.type == "cuda":  # CUDA graphs, their streams and the RNG state saved are the current device's
        torch.cuda.set_device(device)
    return device


class Progress(tqdm):
    """tqdm's bar on a terminal; elsewhere (a SLURM log) a plain line at the start, then at most one per `every` s."""

    def __init__(self, desc: str, total: Optional[int], unit: str, initial: int = 0, every: float = 45.0):
        self.plain = not sys.stdout.isatty()
        plain = dict(file=sys.stdout, mininterval=every, maxinterval=every, miniters=0, leave=False,
                     bar_format=f"{{desc}}: {{n_fmt}}/{{total_fmt}} {unit if unit == 'B' else unit + 's'} "
                                "[{elapsed}, {rate_fmt}{postfix}]")
        super().__init__(desc=desc, total=total, initial=initial, unit=unit, unit_scale=unit == "B",
                         **(plain if self.plain else {}))

    def display(self, msg=None, pos=None):
        if not self.plain:
            return super().display(msg, pos)
        if msg != "":  # "": tqdm clearing the bar
            print(self, flush=True)


def atomic_save(path: Path, obj) -> None:  # a crash never leaves half a file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2)) if path.suffix == ".json" else torch.save(obj, tmp)
    tmp.replace(path)


def log_scalars(writer: Optional[SummaryWriter], scalars: dict, step: int, where: str = "update",
                checkpoint: Optional[Path] = None) -> None:
    for name, value in scalars.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite {name} ({value}) at {where} {step}; stopping. Last checkpoint: "
                                     f"{checkpoint or 'none'}")
        if writer is not None:
            writer.add_scalar(name, value, step)


def record(writer: SummaryWriter, results: dict, run_dir: Path, summary: dict, epoch: int, step: int) -> None:
    for k, v in summary.items():
        writer.add_scalar(f"eval/{k}", v, step)
    shown = ", ".join(f"{k} {summary[k]:.1f} ± {summary[k + '_std']:.1f}" for k in (
        "return", "normalized_score", "model_return", "penalized_model_return") if k in summary)
    print(f"epoch {epoch} step {step}: {shown}", flush=True)
    if summary.get("bound_broken"):  # D18
        results["bound_broken_evaluations"] += 1
        print(f"warning: Theorem 4.4's bound broken: penalized model − real return {summary['bound_gap']:.1f} ± "
              f"{summary['bound_gap_std']:.1f}; λ = {results['lam']} is likely too small for this model and data")
    results["evaluations"].append({"step": step, "epoch": epoch, **summary})
    results.update({f"final_{k}": summary.get(k) for k in RESULT_KEYS})
    atomic_save(run_dir / "results.json", results)


def load_file(path: str, name: str, keys: tuple, fix: str) -> tuple[Path, dict]:
    path = Path(path) / name if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated, empty or foreign file
        if "GLOBAL " in str(e):  # mopo.py saves tensors and plain values; an object may run code when loaded
            raise ValueError(f"{path} holds a pickled object, refused: it could run code (GLOBAL "
                             f"{str(e).split('GLOBAL ')[1].split()[0]}); {fix}") from None
        first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's first sentence; a KeyError's may be '101'
        detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise ValueError(f"{path} is damaged or not a torch file ({detail}); {fix}") from None
    if missing := [k for k in keys if not isinstance(obj, dict) or k not in obj]:
        raise ValueError(f"{path} lacks {missing}: not what mopo.py writes there; {fix}")
    return path, obj


def load_dynamics(path: str, model: EnsembleDynamics, env_id: str) -> dict:
    fix = "--dynamics-path takes a run folder or its dynamics.pt (a run with --epochs 0 trains one)"
    file, saved = load_file(path, "dynamics.pt", ("state_dict", "config", "env_id", "stats"), fix)
    config = {"spectral_norm": False} | saved["config"]  # files from before --spectral-norm lack the key
    if wrong := [f"{k} {config.get(k)} in the file vs {v} here" for k, v in model.config.items() if config.get(k) != v]:
        raise ValueError(f"{file} does not fit this run ({'; '.join(wrong)}); pass the flags it was trained with")
    model.load_state_dict(saved["state_dict"])
    if saved["env_id"] != env_id:
        print(f"note: {file} was trained on {saved['env_id']}, this run is {env_id}")
    return saved["stats"]


def read_checkpoint(args: Args) -> tuple[Args, Optional[dict]]:
    if args.resume is None:
        return args, None
    fix = "--resume takes a run folder or its checkpoint.pt; start afresh without it"
    path, ckpt = load_file(args.resume, "checkpoint.pt", ("phase", "args", "data_fingerprint", "rng"), fix)
    try:
        saved = Args(**ckpt["args"])
    except TypeError as e:
        raise ValueError(f"{path} is from another version of mopo.py ({e}); {fix}") from None
    defaults, kept = asdict(Args()), asdict(saved)
    if ignored := [k for k, v in asdict(args).items() if k != "resume" and v not in (defaults[k], kept[k])]:
        print(f"--resume: ignoring {ignored}; a resumed run keeps the settings it started with")
    return replace(saved, resume=args.resume), ckpt | {"run_dir": path.parent}


def save_checkpoint(run_dir: Path, state: dict) -> None:  # tensors and plain values only: loads with weights_only
    atomic_save(run_dir / "checkpoint.pt", state | {"rng": {
        "torch": torch.get_rng_state(), "python": random.getstate(), "numpy": [  # its key array as a tensor
            torch.from_numpy(v.astype(np.int64)) if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}})  # the current device's


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state([v.numpy().astype(np.uint32) if torch.is_tensor(v) else v for v in rng["numpy"]])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def restore(ckpt: dict, sac: SAC, opts: dict, model_buffer: ReplayBuffer) -> int:
    sac.load_state_dict(ckpt["sac"])
    for k, o in opts.items():
        load_optimizer(o, ckpt["optimizers"][k])
    model_buffer.load_state_dict(ckpt["model_buffer"])
    restore_rng(ckpt["rng"])
    print(f"resumed {ckpt['run_dir']} at update {ckpt['step']}")
    return ckpt["step"]


def on_signals(handler) -> dict:
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def stop(run_dir: Optional[Path], signum: int, where: str = "the last finished model epoch") -> None:
    ckpt = run_dir and run_dir / "checkpoint.pt"
    print(f"{signal.Signals(signum).name}: " + (f"checkpoint at {where} in {ckpt}; continue with --resume {run_dir}"
                                                 if ckpt and ckpt.is_file() else "stopped; nothing new was saved"))
    raise SystemExit(143)


def rollout_length_and_lam(args: Args, task: Task) -> tuple[int, float]:
    """D15: the flags, else the task's published setting."""
    h, lam = TASK_DEFAULTS.get(task.dataset, {}).get(task.family, OTHER_TASK_DEFAULT)
    h, lam = args.rollout_length or h, lam if args.lam is None else args.lam  # rollout_length is None or >= 1
    print(f"{args.env_id}: h = {h} ({'task default' if args.rollout_length is None else '--rollout-length'}), "
          f"λ = {lam} ({'task default' if args.lam is None else '--lam'}), penalty = {args.penalty}")
    return h, lam


def load_real_data(task: Task, args: Args, env: gym.Env, device: torch.device, ckpt: Optional[dict]):
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    data = get_dataset(task, args.dataset_path, obs_dim, act_dim)
    fingerprint = [len(data["rewards"]), float(data["rewards"].sum(dtype=np.float64))]  # a resume must match it
    if ckpt is not None and ckpt["data_fingerprint"] != fingerprint:
        raise ValueError(f"the dataset changed since the checkpoint ([rows, reward sum] {ckpt['data_fingerprint']} "
                         f"vs {fingerprint}); resume needs the same data")
    real = ReplayBuffer(fingerprint[0], obs_dim, act_dim, device)
    real.add(to_rows(*(torch.as_tensor(data[k], device=device) for k in DATA_KEYS)))
    print(f"dataset: {real.size} transitions, obs_dim {obs_dim}, act_dim {act_dim}, device {device}")
    return real, fingerprint


def make_writer(args: Args, run_dir: Path, purge_step: Optional[int]) -> SummaryWriter:
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, name=run_dir.name,
                   config=vars(args), id=run_dir.name, resume="allow", save_code=True)
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def main(args: Args) -> dict:
    previous = on_signals(lambda signum, _: stop(None, signum))  # while the data loads, a signal stops the run at once
    try:
        args, ckpt = read_checkpoint(args)
        device = check_args(args)
        task = make_task(args.env_id)
        h, lam = rollout_length_and_lam(args, task)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        graph = args.cuda_graph and device.type == "cuda"
        env = make_env(task)
        real, fingerprint = load_real_data(task, args, env, device, ckpt)
        obs_dim, act_dim = real.fields[:2]
        dynamics = EnsembleDynamics(obs_dim, act_dim, args.num_ensemble, args.num_elites, args.dynamics_hidden_dim,
                                    args.spectral_norm).to(device)
        if ckpt is None and args.dynamics_path is not None:  # checked before a run folder exists
            dyn_stats = load_dynamics(args.dynamics_path, dynamics, args.env_id)
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = ckpt["run_dir"] if ckpt else Path("runs", run_name)
        run_dir.mkdir(parents=True, exist_ok=ckpt is not None)  # never write into another run's folder
        resumed = ckpt is not None and ckpt["phase"] == "policy"
        writer = make_writer(args, run_dir, ckpt["step"] + 1 if resumed else None)  # a resume drops later events
        header = {"args": asdict(args), "data_fingerprint": fingerprint}

        # Model learning (Alg. 2, line 1): independent of λ, h and SAC, so it can be trained once and reused.
        if resumed:
            dyn_stats = ckpt["results"]["dynamics"]
            dynamics.load_state_dict(ckpt["dynamics"])
        elif args.dynamics_path is None:
            if ckpt is not None:  # stopped during model learning
                dynamics.load_state_dict(ckpt["dynamics"])
                restore_rng(ckpt["rng"])
            log = SummaryWriter(str(run_dir / "dynamics"), purge_step=ckpt and ckpt["training"]["epoch"] + 1)
            on_signals(lambda signum, _: log.close() or stop(run_dir, signum))  # at once; resumes from an epoch end
            on_epoch = lambda training: save_checkpoint(run_dir, header | {  # noqa: E731
                "phase": "dynamics", "dynamics": dynamics.state_dict(), "training": training})
            dyn_stats = train_dynamics(dynamics, model_data(real), args, log, ckpt and ckpt["training"], on_epoch)
            log.close()
        atomic_save(run_dir / "dynamics.pt", {
            "state_dict": dynamics.state_dict(), "config": dynamics.config, "env_id": args.env_id, "stats": dyn_stats})
        print(f"dynamics: {dyn_stats['epochs']} epochs, holdout MSE {dyn_stats['holdout_mse']:.4g} "
              f"(elites {dyn_stats['elite_holdout_mse']:.4g})")
        dynamics.eval()  # only predictions from here on: rollouts and the gauge keep D16's exact σ

        # Policy optimization on the penalized MDP (Alg. 2, lines 2-9)
        sac = SAC(obs_dim, act_dim, env.action_space, args.alpha).to(device)
        opts = sac_optimizers(sac, args, device, capturable=graph)
        model_rows = args.model_retain_epochs * args.rollout_batch_size * h if args.real_ratio < 1 else 1  # D9, D10
        model_buffer = ReplayBuffer(model_rows, obs_dim, act_dim, device)
        step_fn = partial(model_step, dynamics, penalty_kind=args.penalty, termination_fn=TERMINATION_FNS[task.family])
        results = ckpt["results"] if resumed else {
            "env_id": args.env_id, "seed": args.seed, "lam": lam, "rollout_length": h, "run_name": run_dir.name,
            "dynamics": dyn_stats, **{f"final_{k}": None for k in RESULT_KEYS}, "evaluations": [],
            "bound_broken_evaluations": 0 if args.gauge else None,
            "args": asdict(replace(args, resume=None))}  # the settings, not the --resume that continued them
        header |= {"phase": "policy", "dynamics": dynamics.state_dict(), "results": results}
        save = lambda step: save_checkpoint(run_dir, header | {  # noqa: E731 - enough to continue bit for bit (CPU)
            "step": step, "sac": sac.state_dict(), "optimizers": {k: o.state_dict() for k, o in opts.items()},
            "model_buffer": model_buffer.state_dict()})
        start_step = restore(ckpt, sac, opts, model_buffer) if resumed else 0
        signals = []  # from here a signal checkpoints at the update it lands on, then stops the run
        on_signals(lambda signum, _: signals.append(signum))
        save(start_step)
        envs = gym.vector.SyncVectorEnv([lambda: make_env(task)] * args.eval_episodes)
        cpu_actor = copy.deepcopy(sac.actor).cpu()  # D14: the envs step on the CPU
        horizon = env.spec.max_episode_steps or 1000  # D17: the gauge's episodes as long as the env's
        gauge = (lambda s: model_returns(sac.actor, step_fn, s.to(device), horizon, lam, graph)) if args.gauge else None

        def update() -> dict:  # Alg. 2, line 8: one SAC step on a batch of real and model rows (D10)
            return sac_update(sac, opts, real.split(sample_mixed(real, model_buffer, args.batch_size, args.real_ratio)),
                              args)
        if graph:  # the same update, recorded once and replayed
            update = cuda_graph(update)
        total_updates, start_time = args.epochs * args.steps_per_epoch, time.time()
        progress = Progress("MOPO", total_updates, "update", start_step)
        for global_step in range(start_step + 1, total_updates + 1):
            if (global_step - 1) % args.rollout_freq == 0 and args.real_ratio < 1:  # Alg. 2, lines 3-7 (D8)
                start_obs = real.split(real.sample(args.rollout_batch_size))[0]  # dataset states s
                rows, stats = rollout(sac.actor, step_fn, start_obs, h, lam)
                model_buffer.add(rows)
                log_scalars(writer, {f"rollout/{k}": v.item() for k, v in stats.items()} | {
                    "rollout/transitions": len(rows), "rollout/model_buffer_size": model_buffer.size},
                    global_step, checkpoint=run_dir / "checkpoint.pt")
            info = update()
            progress.update()  # on the host only: no sync
            epoch, end_of_epoch = divmod(global_step, args.steps_per_epoch)
            last = global_step == total_updates  # its checkpoint is the run's final one
            checkpoint_now = (end_of_epoch == 0 and epoch % args.checkpoint_freq == 0) or last or bool(signals)
            if global_step % args.log_freq == 0 or checkpoint_now:  # the only host syncs of the update loop
                sps = int((global_step - start_step) / (time.time() - start_time))
                log_scalars(writer, {k: float(v) for k, v in info.items()} | {"charts/SPS": sps}, global_step,
                            checkpoint=run_dir / "checkpoint.pt")
            if end_of_epoch == 0 and (epoch % args.eval_freq == 0 or epoch == args.epochs):
                cpu_actor.load_state_dict(sac.actor.state_dict())
                episodes = evaluate(cpu_actor, envs, args.seed + global_step, gauge)
                record(writer, results, run_dir, summarize(task, episodes), epoch, global_step)
            if checkpoint_now or signals:  # a signal may have come during the evaluation
                save(global_step)
            if signals:
                writer.close()
                stop(run_dir, signals[0], f"update {global_step}")
        progress.close()
        if args.save_model:
            atomic_save(run_dir / "model.pt", sac.state_dict())
        atomic_save(run_dir / "results.json", results)
        print(f"done in {time.time() - start_time:.0f} s: {run_dir / 'results.json'}")
        for resource in (envs, env, writer):
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
