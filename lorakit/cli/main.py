"""`lorakit`: one entry point, one subcommand per job. Every option can also come from --config FILE.yaml."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from ..errors import LorakitError
from .args import add_options, build_config

# The modules that define subcommands besides train (each registers itself with @command).
COMMAND_MODULES = ("commands", "evaluate", "adapters", "estimate", "serve", "combine", "runs", "export")
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

    # allow_abbrev=False everywhere: `--max-step` must be an error, not `--max-steps` (and a prefix accepted
    # today would become ambiguous, and break a user's command, when a longer option is added)
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, generate, "
                                     "merge and inspect. `lorakit COMMAND --help` lists a command's options.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=_versions(),
                        help="print lorakit's version and those of torch and transformers, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; "
                       "command-line options override it")
        configure(p)
    return parser


def _versions() -> str:
    """'lorakit 0.1.0 (torch 2.13.0+cpu, transformers 5.25.0, peft -)': what a bug report needs, read from the
    installed packages' metadata (nothing imported)."""
    from importlib import metadata

    from .. import __version__

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    return f"lorakit {__version__} (" + ", ".join(f"{n} {version(n)}" for n in ("torch", "transformers", "peft")) + ")"


def _quiet_import_noise() -> None:
    """transformers imports torchao when it is installed (lorakit's QLoRA extra), and torchao logs about
    CUDA-only kernels it cannot load and enum registrations; none of it concerns a lorakit user. (`import lorakit`
    drops those known messages for library users, lorakit.import_noise; the command line hides the rest of
    these two loggers' warnings too.)"""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _one_line_warnings() -> None:
    """A warning reads as one line, 'warning: ...', without Python's file:line and the echoed source line
    (which pointed into lorakit, not at anything the user wrote)."""
    import warnings

    def format_warning(message, category, filename, lineno, line=None) -> str:
        kind = "warning" if category is UserWarning else category.__name__
        return f"{_off_the_bar()}{kind}: {message}\n"

    warnings.formatwarning = format_warning


def _off_the_bar() -> str:
    """What puts a message on a line of its own while a progress bar is drawn on stderr: a new line (the bar's
    own line, finished or not, stays as it is; the bar draws itself again below)."""
    from tqdm import tqdm

    return "\n" if getattr(tqdm, "_instances", None) else ""


def parse_command_line(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse `argv`; a mistyped command gets "did you mean", and an unknown option is reported with the usage of
    the command it was given to (argparse reports it with the top-level usage, which lists no options)."""
    import difflib

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.6)
        parser.error(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]}?" if close else "")
                     + f" (commands: {', '.join(COMMANDS)})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser = _subparsers(parser).get(args.command, parser)
        options = [s for action in command_parser._actions for s in action.option_strings]
        hints = [close[0] for arg in unknown if arg.startswith("--")
                 for close in [difflib.get_close_matches(arg.split("=", 1)[0], options, n=1, cutoff=0.7)] if close]
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                             + (f"; did you mean {', '.join(hints)}?" if hints else "")
                             + f" (`lorakit {args.command} --help` lists the options)" * bool(args.command))
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Optional[Sequence[str]] = None) -> None:
    _quiet_import_noise()
    _one_line_warnings()
    parser = build_parser()
    args = parse_command_line(parser, argv)
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
