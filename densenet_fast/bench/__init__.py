"""Benchmarks: ``python -m densenet_fast bench <kernels|models|depth>``.

Each subcommand module has ``add_arguments(parser)``, ``run(args) -> dict``
(writes JSON and PNG) and ``main(argv)`` (used by the ``benchmarks/`` scripts).
"""
