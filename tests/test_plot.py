"""benchmarks/plot.py: curves from results.json files, mean ± std across seeds."""
import json

import numpy as np
import pytest

import plot


def write_run(root, env_id, seed, scores, exp_name="mopo", normalized=True):
    run = root / f"{env_id}__{exp_name}__{seed}__0"
    run.mkdir(parents=True)
    evaluations = [{"step": 1000 * (i + 1), "return": 10.0 * v, **({"normalized_score": v} if normalized else {})}
                   for i, v in enumerate(scores)]
    run.joinpath("results.json").write_text(json.dumps(
        {"env_id": env_id, "seed": seed, "evaluations": evaluations, "args": {"exp_name": exp_name, "seed": seed}}))


def test_curves_average_seeds_on_shared_steps(tmp_path):
    write_run(tmp_path, "hopper-medium-v2", 1, [10, 20, 30])
    write_run(tmp_path, "hopper-medium-v2", 2, [30, 40])  # stopped early: only the shared steps are averaged
    write_run(tmp_path, "InvertedPendulum-v4", 1, [5, 6], normalized=False)
    curves = plot.curves(list(plot.find_results([str(tmp_path)])), None)
    steps, mean, std, seeds, metric = curves["hopper-medium-v2"]["hopper-medium-v2"]
    assert steps.tolist() == [1000, 2000] and mean.tolist() == [20, 30] and std.tolist() == [10, 10]
    assert seeds == 2 and metric == "normalized_score"
    assert curves["InvertedPendulum-v4"]["InvertedPendulum-v4"][4] == "return"  # no reference scores: raw returns
    out = plot.main(plot.Args(runs=(str(tmp_path),), out=str(tmp_path / "curves.png"), title="test"))
    assert out.stat().st_size > 10_000


def test_label_by_splits_curves(tmp_path):
    write_run(tmp_path, "hopper-medium-v2", 1, [1, 2], exp_name="a")
    write_run(tmp_path, "hopper-medium-v2", 1, [3, 4], exp_name="b")
    curves = plot.curves(list(plot.find_results([str(tmp_path)])), "exp_name")
    assert sorted(curves["hopper-medium-v2"]) == ["exp_name=a", "exp_name=b"]
    np.testing.assert_array_equal(curves["hopper-medium-v2"]["exp_name=b"][1], [3, 4])


def test_bad_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        list(plot.find_results([str(tmp_path / "nope")]))
