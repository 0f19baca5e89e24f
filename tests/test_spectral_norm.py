"""--spectral-norm (D16): the paper's Lipschitz-regularized model, which the authors' code never applied."""
import importlib.util
import json
import subprocess
import types
from pathlib import Path

import pytest
import torch

import mopo
from test_dynamics import known_system

ROOT = Path(__file__).resolve().parents[1]
# When --spectral-norm landed, REFERENCE was 6a3f1eb, the last commit without it, and the test below passed: the flag
# changed nothing for runs without it. Since then REFERENCE names the last intentional change of default numerics
# (fused Adam, weight decay in Adam, 1,024-row rollout chunks; since: sampling reads the buffer's fill level from a
# device tensor, for CUDA graphs), so the test keeps default runs from drifting. On CPU: bit-identity is a CPU promise.
REFERENCE = "d0a957dedfa152508f1306908913ca73e6ca4874"


def trained(spectral_norm, epochs=15):
    torch.manual_seed(0)
    obs, act, target = known_system(1500)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=4, num_elites=2, hidden_dim=32, spectral_norm=spectral_norm)
    args = types.SimpleNamespace(num_ensemble=4, num_elites=2, holdout_size=300, dynamics_lr=3e-3,
                                 dynamics_batch_size=64, dynamics_max_epochs=epochs)
    stats = mopo.train_dynamics(model, obs, act, target, args)
    return model, stats


def test_normalized_layers_have_spectral_norm_at_most_one_and_variance_head_is_untouched():
    model, stats = trained(spectral_norm=True)
    for layer in [*model.hidden, model.mean_head]:
        raw = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)  # [E]: training let the raw weights grow
        normalized = torch.linalg.matrix_norm(layer.normalized_weight().detach(), ord=2)
        assert normalized.shape == (4,) and (normalized <= 1 + 1e-3).all(), normalized
        assert (normalized >= 0.99).all() and ((raw - 1).abs() > 0.05).any()  # normalization did something
    assert not model.logvar_head.spectral_norm and not hasattr(model.logvar_head, "sn_u")
    assert stats["holdout_mse"] < known_system(1500)[2].var(0).mean()  # still learns


def test_forward_uses_the_normalized_weights():
    model, _ = trained(spectral_norm=True, epochs=2)
    model.eval()
    x = torch.randn(5, 5)
    h = (x - model.input_mean) / model.input_std
    for layer in model.hidden:
        h = torch.nn.functional.silu(h @ layer.normalized_weight()[1] + layer.bias[1])
    mean, _ = model(x[:, :3], x[:, 3:])
    torch.testing.assert_close(mean[1], h @ model.mean_head.normalized_weight()[1] + model.mean_head.bias[1])


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_the_flag_runs_are_bit_identical_to_the_reference(hopper_file, tmp_path, monkeypatch):
    source = subprocess.run(["git", "show", f"{REFERENCE}:mopo.py"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode != 0:
        pytest.skip(f"git history without {REFERENCE[:7]} (shallow clone?)")
    (tmp_path / "mopo_before.py").write_text(source.stdout)
    before = load_module(tmp_path / "mopo_before.py", "mopo_before")
    flags = dict(env_id="hopper-medium-v2", dataset_path=str(hopper_file), epochs=2, steps_per_epoch=50,
                 rollout_freq=25, rollout_batch_size=200, eval_episodes=2, dynamics_max_epochs=3, batch_size=64,
                 device="cpu")
    results = []
    for module, folder in ((before, "before"), (mopo, "now")):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        results.append(module.main(module.Args(**flags)))
        (run_dir,) = (tmp_path / folder / "runs").iterdir()
        results[-1]["weights"] = torch.load(run_dir / "dynamics.pt", weights_only=True)["state_dict"]
    old, new = results
    # evaluations gained keys since (the model-return gauge): the reference's keys must be the same
    assert json.dumps(old["evaluations"]) == json.dumps([{k: e[k] for k in o} for o, e in zip(old["evaluations"],
                                                                                             new["evaluations"])])
    assert old["dynamics"] == new["dynamics"]
    assert old["weights"].keys() == new["weights"].keys()
    assert all(torch.equal(old["weights"][k], new["weights"][k]) for k in old["weights"])
