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


def write_gauge_run(root, name, evaluations, **top):
    run = root / name
    run.mkdir(parents=True)
    run.joinpath("results.json").write_text(json.dumps(
        {"env_id": "hopper-medium-v2", "seed": 1, "evaluations": evaluations, "args": {"exp_name": "mopo"}, **top}))
    return run


def gauge_evals(real, model, penalized, steps=(1000, 2000, 3000)):
    return [{"step": s, "epoch": i + 1, "return": r, "return_std": 1.0, "normalized_score": r / 30,
             "normalized_score_std": 0.1, "model_return": m, "model_return_std": 2.0, "penalized_model_return": p,
             "penalized_model_return_std": 3.0, "length": 100 + i, "length_std": 4.0, "model_length": 50 + i,
             "model_length_std": 5.0} for i, (s, r, m, p) in enumerate(zip(steps, real, model, penalized))]


def old_evals(real, steps=(1000, 2000)):  # results.json made before mopo.py logged the gauge keys
    return [{"step": s, "epoch": i + 1, "return": r, "return_std": 1.0} for i, (s, r) in enumerate(zip(steps, real))]


def test_gauge_extracts_returns_and_lengths():
    steps, series = plot.gauge({"evaluations": gauge_evals([10, 20, 30], [50, 60, 70], [5, 25, 15])})
    assert steps.tolist() == [1000, 2000, 3000]
    assert sorted(series) == sorted([*plot.RETURNS, *plot.LENGTHS])
    np.testing.assert_array_equal(series["return"][0], [10, 20, 30])
    np.testing.assert_array_equal(series["model_return"][0], [50, 60, 70])
    np.testing.assert_array_equal(series["penalized_model_return"], [[5, 25, 15], [3, 3, 3]])
    np.testing.assert_array_equal(series["length"], [[100, 101, 102], [4, 4, 4]])
    np.testing.assert_array_equal(series["model_length"], [[50, 51, 52], [5, 5, 5]])


def test_gauge_skips_old_runs_and_old_evaluations():
    assert plot.gauge({"evaluations": old_evals([1, 2])}) is None
    assert plot.gauge({"evaluations": []}) is None
    # a run resumed across the change: only the evaluations with the keys are drawn
    steps, series = plot.gauge({"evaluations": old_evals([1]) + gauge_evals([10], [20], [5], steps=(2000,))})
    assert steps.tolist() == [2000] and series["return"][0].tolist() == [10]


def test_gauge_plot_writes_png_and_skips_old_runs(tmp_path, capsys):
    write_gauge_run(tmp_path, "hopper-medium-v2__mopo__1__1", gauge_evals([10, 20, 30], [50, 60, 70], [5, 25, 15]),
                    lam=1.0, rollout_length=5)
    write_gauge_run(tmp_path, "hopper-medium-v2__mopo__2__2", gauge_evals([10, 20], [50, 60], [1, 2]))  # no lam, h
    write_gauge_run(tmp_path, "hopper-medium-v2__old__1__3", old_evals([1, 2]), lam=1.0, rollout_length=5)
    out = plot.main(plot.Args(runs=(str(tmp_path),), out=str(tmp_path / "gauge.png"), gauge=True))
    assert out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "skipped" in printed and "hopper-medium-v2__old__1__3" in printed
    assert "hopper-medium-v2__mopo__1__1" not in printed


def test_gauge_titles_and_bound_count(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_gauge_run(tmp_path, "a", gauge_evals([10, 20, 30], [50, 60, 70], [5, 25, 15]), lam=2.5,
                          rollout_length=5)
    write_gauge_run(tmp_path, "b__no_lam", gauge_evals([10], [50], [5]))
    write_gauge_run(tmp_path, "c__old", old_evals([1, 2]), lam=1.0, rollout_length=5)
    fig = plot.plot_gauge(plot.Args(runs=(str(tmp_path),), gauge=True), plt)
    top = fig.axes[:2]  # one column per gauge run, old run skipped: 2 × 2 axes
    assert len(fig.axes) == 4
    assert top[0].get_title() == "hopper-medium-v2  λ=2.5  h=5  seed=1\npenalized ≤ real at 2/3 evaluations"
    assert top[1].get_title().startswith("b__no_lam\n")
    assert [line.get_label() for line in top[0].get_lines()] == [label for label, _ in plot.RETURNS.values()]
    np.testing.assert_array_equal(top[0].get_lines()[2].get_ydata(), [5, 25, 15])
    plt.close(fig)


def test_gauge_without_any_gauge_run_is_a_clear_error(tmp_path):
    write_gauge_run(tmp_path, "old", old_evals([1, 2]))
    with pytest.raises(SystemExit, match="no run has the gauge keys"):
        plot.main(plot.Args(runs=(str(tmp_path),), out=str(tmp_path / "gauge.png"), gauge=True))


def test_half_written_results_are_skipped_and_lam_labels_show_the_value_used(tmp_path, capsys):
    write_run(tmp_path, "hopper-medium-v2", 1, [1, 2])
    run = tmp_path / "hopper-medium-v2__mopo__1__0"
    results = json.loads((run / "results.json").read_text())
    results["lam"], results["args"]["lam"] = 5.0, None  # the task default: the flag was not given
    (run / "results.json").write_text(json.dumps(results))
    broken = tmp_path / "hopper-medium-v2__mopo__2__0"
    broken.mkdir()
    (broken / "results.json").write_text('{"env_id": "hopper-medium-v2", "evalu')  # a run killed mid-write
    curves = plot.curves(list(plot.find_results([str(tmp_path)])), "lam")
    assert list(curves["hopper-medium-v2"]) == ["lam=5.0"]
    assert f"skipped {broken / 'results.json'}" in capsys.readouterr().out
