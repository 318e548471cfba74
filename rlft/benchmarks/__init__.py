"""`rlft bench NAME`: benchmarks, one module each (a module exposes ``register(bench_subparsers)``)."""

from __future__ import annotations

import importlib

#: benchmark modules, each adding one `rlft bench <name>` parser
BENCHMARK_MODULES = [
    "rlft.benchmarks.env_throughput",  # rlft bench env-throughput (issue 4)
    "rlft.benchmarks.elegant",  # rlft bench elegant (issue 5)
    "rlft.benchmarks.rllib_throughput",  # rlft bench rllib-throughput (issue 6)
    "rlft.benchmarks.rllib",  # rlft bench rllib (issue 6)
    "rlft.benchmarks.tfbind8",  # rlft bench tfbind8 (issue 7)
    "rlft.benchmarks.conditional",  # rlft bench conditional (issue 19)
    "rlft.benchmarks.smeme",  # rlft bench smeme (issue 17)
    "rlft.benchmarks.adjoint_matching",  # rlft bench adjoint-matching (issue 17)
    "rlft.benchmarks.scale",  # rlft bench scale (issue 20)
    "rlft.benchmarks.dg",  # rlft bench dg (issue 18)
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (see `rlft bench --help`)")
    bench_sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name in BENCHMARK_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(bench_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
