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
        sub.set_defaults(bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    """Exit status 1 where every worker failed (each reason is on stderr), else 0."""
    from .common import worker_outcomes
    worker_outcomes.clear()
    try:
        args.bench_run(args)
    except KeyboardInterrupt:  # its worker is stopped (common.run_worker); what was measured is written
        print("\nbench: interrupted (the results measured so far are in the JSON)", file=sys.stderr)
        return 130
    if worker_outcomes["failed"] and not worker_outcomes["measured"]:
        print("error: no implementation measured anything (the reasons are above, and in the JSON)", file=sys.stderr)
        return 1
    return 0
