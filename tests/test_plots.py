"""Plots a new user reads: a short run's loss curve has points, loss and lr do not hide each other, the title
names the run; the rank plot says which colour is which layer."""
from __future__ import annotations

import torch

from lorakit import LoraConfig
from lorakit.cli.adapters import spectra_figure
from lorakit.lora.spectrum import adapter_spectra
from lorakit.train import Trainer, read_metrics
from lorakit.train.metrics import log_interval
from lorakit.train.report import metrics_figure, run_title
from tests.test_train_fixtures import collate, fast_config, random_examples, tiny_lora_model


def test_the_default_log_interval_follows_the_run_length():
    assert log_interval(None, 4) == 1 and log_interval(None, 30) == 1  # every step: a curve, not 2 points
    assert log_interval(None, 1000) == 20  # about 50 points
    assert log_interval(None, 100_000) == 25  # capped
    assert log_interval(7, 30) == 7  # --log-every wins


def test_a_short_run_has_a_marked_loss_curve_apart_from_the_lr_and_a_title_naming_it(tmp_path):
    run_dir = tmp_path / "my-short-run"
    data = random_examples(16)
    Trainer(tiny_lora_model(), data, collate, fast_config(max_steps=4, log_every=None, warmup_steps=2),
            run_dir, eval_data=data[:4], progress=False).fit()
    events = read_metrics(run_dir / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    fig = metrics_figure(events, run_title(run_dir))
    loss_ax, lr_ax = fig.axes
    train_line = next(line for line in loss_ax.lines if line.get_label().startswith("train loss"))
    assert train_line.get_marker() == "o" and len(train_line.get_xdata()) == 4
    assert [line.get_label() for line in loss_ax.lines] == [train_line.get_label(), "eval loss"]
    assert len(lr_ax.lines) == 1 and lr_ax.get_ylabel() == "learning rate"
    assert lr_ax.get_position().y1 <= loss_ax.get_position().y0  # a panel of its own, below (not a twin axis)
    assert fig._suptitle.get_text().startswith("lorakit run my-short-run: model ")


def test_rank_plot_colours_lines_by_layer_number_with_a_colorbar():
    prefix = "base_model.model.model.layers"
    torch.manual_seed(0)
    tensors = {}
    for layer in range(12):
        tensors[f"{prefix}.{layer}.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 8)
        tensors[f"{prefix}.{layer}.self_attn.q_proj.lora_B.weight"] = torch.randn(8, 2)
    spectra = adapter_spectra(LoraConfig(r=2, lora_alpha=4), dict(sorted(tensors.items())))
    fig = spectra_figure(spectra, "t")
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "layer" in colorbars[0].get_ylabel()
    low, high = colorbars[0].get_ylim()
    assert (low, high) == (0, 11)
    # line i is layer i: its colour is the colormap at i / 11 (dark early layers, light late ones)
    from matplotlib import colormaps

    top = fig.axes[0]
    for layer, line in enumerate(top.lines):
        expected = colormaps["viridis"](layer / 11)
        assert tuple(round(c, 4) for c in line.get_color()) == tuple(round(c, 4) for c in expected)
