"""`lorakit runs compare RUN_DIR...`: a rank sweep's table (the options that differ, the final figures) and
its loss curves on shared axes, from the run folders alone."""
from __future__ import annotations

import json

import pytest

from lorakit.cli.main import main
from lorakit.errors import ConfigError
from lorakit.train.compare import comparison_table, differing_options, plot_comparison, read_run, run_label
from tests.test_train_fixtures import one_torch_thread, write_chat_data, write_tiny_model_dir  # noqa: F401


@pytest.fixture(scope="module")
def rank_sweep(tmp_path_factory):
    """Three `lorakit train` runs of a tiny model that differ only in r (4, 8, 16)."""
    root = tmp_path_factory.mktemp("sweep")
    model = write_tiny_model_dir(root / "model")
    data = write_chat_data(root / "train.jsonl", 24)
    runs = []
    for r in (4, 8, 16):
        out = root / f"r{r}"
        main(["train", "--model", model, "--data", data, "--out", str(out), "--max-steps", "6", "--batch-size", "4",
              "--seq-len", "64", "--device", "cpu", "--log-every", "1", "--save-every", "0", "--eval-every", "3",
              "--lr", "5e-3", "--r", str(r)])
        runs.append(out)
    return runs


def test_the_table_shows_what_differs_and_each_runs_final_figures(rank_sweep, capsys, tmp_path):
    png = tmp_path / "compare.png"
    capsys.readouterr()
    main(["runs", "compare", *map(str, rank_sweep), "--plot", str(png)])
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line and not line.startswith("-")}
    assert rows["run"] == ["r4", "r8", "r16"]
    assert rows["r"] == ["4", "8", "16"]
    assert "out" not in rows and "seed" not in rows and "lr" not in rows  # the same in every run, or its name
    summaries = [json.loads((run / "summary.json").read_text()) for run in rank_sweep]
    assert rows["final_loss"] == [f"{s['final_loss']:.4g}" for s in summaries]
    assert rows["final_eval_loss"] == [f"{s['final_eval_loss']:.4g}" for s in summaries]
    assert rows["trainable_params"] == [f"{s['trainable_params']:,}" for s in summaries]
    assert summaries[0]["trainable_params"] * 2 == summaries[1]["trainable_params"]  # (r doubles: so do A and B)
    assert f"loss curves: {png}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_has_one_labelled_curve_per_run_on_shared_axes(rank_sweep, tmp_path):
    runs = [read_run(path) for path in rank_sweep]
    assert differing_options(runs) == ["r"]
    assert [run_label(run, ["r"]) for run in runs] == ["r4 (r=4)", "r8 (r=8)", "r16 (r=16)"]
    import matplotlib.image

    png = plot_comparison(runs, tmp_path / "curves.png")
    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (1200, 450)  # two panels: train loss and eval loss


def test_runs_with_the_same_options_and_a_folder_that_is_no_run(rank_sweep, tmp_path):
    same = [read_run(rank_sweep[0]), read_run(rank_sweep[0])]
    assert differing_options(same) == []
    assert "all the same" in comparison_table(same)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a lorakit run folder"):
        read_run(tmp_path / "empty")
    with pytest.raises(SystemExit):  # `lorakit runs` without an action, and a missing folder: errors, exit 2
        main(["runs"])
    with pytest.raises(SystemExit):
        main(["runs", "compare", str(tmp_path / "missing")])
