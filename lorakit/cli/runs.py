"""`lorakit runs compare RUN_DIR...`: a sweep's runs side by side, from their run folders alone (no tracker)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .main import command

DEFAULT_PLOT = "runs_compare.png"


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="runs_command", metavar="ACTION")
    compare = sub.add_parser("compare", help="one table of the options that differ and the final figures, and one "
                             "plot of the loss curves on shared axes", allow_abbrev=False)
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by lorakit train")
    compare.add_argument("--plot", default=DEFAULT_PLOT, metavar="FILE.png",
                         help=f"where to write the loss curves (default: {DEFAULT_PLOT})")


@command("runs", "compare finished runs: `lorakit runs compare RUN_DIR...` (options that differ, final metrics, "
         "loss curves)")(_configure)
def _run(args: argparse.Namespace) -> None:
    from ..train.compare import comparison_table, plot_comparison, read_run

    if getattr(args, "runs_command", None) != "compare":
        raise ConfigError(["give an action: lorakit runs compare RUN_DIR [RUN_DIR ...]"], where="lorakit runs")
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        raise ConfigError([f"{d}: no such folder" for d in missing], where="runs compare")
    runs = [read_run(d) for d in args.run_dirs]
    print(comparison_table(runs))
    plot = plot_comparison(runs, args.plot)
    print(f"\nloss curves: {plot}" if plot else "\nno run has a logged loss yet: no plot written")
