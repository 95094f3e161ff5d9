"""`lorakit`: one entry point, one subcommand per job. Every option can also come from --config FILE.yaml."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from ..errors import LorakitError
from .args import add_options, build_config

# The modules that define subcommands besides train (each registers itself with @command).
COMMAND_MODULES = ("commands", "evaluate", "adapters", "estimate", "serve", "combine")
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {}


def command(name: str, help_text: str):
    """Register `configure(parser)` and `run(args)` for subcommand `name`."""
    def register(configure):
        def with_run(run):
            COMMANDS[name] = (help_text, configure, run)
            return run
        return with_run
    return register


def _train_options(parser: argparse.ArgumentParser) -> None:
    from ..train.config import TrainConfig

    add_options(parser, TrainConfig)


@command("train", "fine-tune with LoRA (no arguments: the embedded model on the built-in demo, on CPU)")(_train_options)
def _train(args: argparse.Namespace) -> None:
    from ..train.config import TrainConfig
    from .train import run_defaults, run_train

    run_train(build_config(TrainConfig, args, defaults=lambda given: run_defaults(
        "data" in given, given.get("task", "causal-lm"))))


def build_parser() -> argparse.ArgumentParser:
    import importlib

    for module in COMMAND_MODULES:  # each registers its subcommands with @command
        importlib.import_module(f"{__package__}.{module}")

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, generate, "
                                     "merge and inspect. `lorakit COMMAND --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter if False else argparse.HelpFormatter)
        p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; "
                       "command-line options override it")
        configure(p)
    return parser


def _quiet_import_noise() -> None:
    """transformers imports torchao when it is installed (lorakit's QLoRA extra), and torchao logs about
    CUDA-only kernels it cannot load and enum registrations; none of it concerns a lorakit user."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _one_line_warnings() -> None:
    """A warning reads as one line, 'warning: ...', without Python's file:line and the echoed source line
    (which pointed into lorakit, not at anything the user wrote)."""
    import warnings

    def format_warning(message, category, filename, lineno, line=None) -> str:
        kind = "warning" if category is UserWarning else category.__name__
        return f"{kind}: {message}\n"

    warnings.formatwarning = format_warning


def main(argv: Optional[Sequence[str]] = None) -> None:
    _quiet_import_noise()
    _one_line_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        sys.exit(2)
    try:
        COMMANDS[args.command][2](args)
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
