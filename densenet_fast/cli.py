"""``python -m densenet_fast <command> ...``.

Each command lives in its own module, listed in :data:`COMMANDS`, which
provides ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).
To add a command, add a line to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .backends import BackendUnavailableError


class CommandFailed(RuntimeError):
    """A command failed while it ran, not for its input (a full disk, a training
    run that diverged): one line, exit status 1."""


# name -> (module, one-line description)
COMMANDS = {
    "train": ("densenet_fast.train", "train a DenseNet (default: DenseNet-BC on the embedded handwritten digits)"),
    "bench": ("densenet_fast.bench", "benchmark densenet_fast against torchvision"),
    "plan": ("densenet_fast.planner", "predict a training step's peak memory per recompute policy; the deepest "
                                      "depth and largest batch under a budget"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every command; only ``command``'s module is imported (so a
    broken or missing command never stops the others, and ``--help`` is quick)."""
    parser = argparse.ArgumentParser(prog="python -m densenet_fast",
                                     description="densenet_fast: a drop-in, faster and leaner DenseNet for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, description) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=description, description=description)
        sub.set_defaults(command_parser=sub)
        if name == command:
            module = importlib.import_module(module_name)
            sub.description = (module.__doc__ or description).strip()
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            module.add_arguments(sub)
            sub.set_defaults(func=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status.

    Errors in the user's input (``ValueError``, which the commands raise for
    bad options and files, and ``BackendUnavailableError``) are printed as one
    line instead of a traceback, with exit status 2; :class:`CommandFailed`
    likewise, with exit status 1; a Ctrl-C that a command does not handle
    itself (the trainer's first one stops after the step) ends with one line
    and status 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))  # (an option before it: named alone)
    args, unknown = parser.parse_known_args(argv)
    command_parser = vars(args).pop("command_parser")  # (the commands save their options; a parser does not pickle)
    if unknown:  # with the usage of the (sub)command they were given to
        given_to_command = not set(unknown) & set(argv[:argv.index(args.command)])
        (command_parser if given_to_command else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (ValueError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{args.command}: aborted (Ctrl-C)", file=sys.stderr)
        return 130
