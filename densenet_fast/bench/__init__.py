"""Benchmarks: ``python -m densenet_fast bench <kernels|models|depth|memory> [options]``.

- ``kernels``: each primitive on each backend against torch's unfused ops;
- ``models``: training and inference of one model, every implementation;
- ``depth``: memory and step time versus DenseNet-BC depth, and the deepest
  depth under a memory budget;
- ``memory``: the memory model's predictions against measured peaks.

Each subcommand module has ``add_arguments(parser)``, ``run(args) -> dict``
(prints a table, writes JSON and PNG to ``--out``, by default to a name of its
own under ``benchmarks/results/``: :func:`.common.new_result_path`) and
``main(argv)`` (used by the ``benchmarks/`` scripts).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("kernels", "models", "depth", "memory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the subcommands (the ``bench`` entry of :mod:`densenet_fast.cli`)."""
    subparsers = parser.add_subparsers(dest="benchmark", metavar="benchmark", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        sub = subparsers.add_parser(name, help=module.__doc__.split("\n\n")[0].split(": ", 1)[-1],
                                    description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(bench_run=module.run, command_parser=sub)


def run(args: argparse.Namespace) -> int:
    """Exit status 1 where a result was wrong, a kernel raised or nothing was
    measured (the reasons are on stderr), 130 on Ctrl-C, else 0."""
    from .common import outcomes
    outcomes.clear()
    try:
        args.bench_run(args)
    except KeyboardInterrupt:  # its worker is stopped (common.run_worker)
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    problems = []
    if outcomes["wrong"]:
        problems.append(f"{outcomes['wrong']} result(s) did not match the reference (the table says which)")
    if outcomes["raised"]:  # a kernel that raises is a fault, not a measurement
        problems.append(f"{outcomes['raised']} call(s) raised (the tracebacks are above, and in the JSON)")
    if outcomes["failed"] and not outcomes["measured"]:
        problems.append("nothing was measured (the reasons are above, and in the JSON)")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0
