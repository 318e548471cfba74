"""The `rlft` command line: one sub-command per module, each module registering its own parser.

A command module exposes ``register(subparsers)`` which adds its parser(s) and sets ``func`` to a
function ``(args) -> int`` (the exit status). Modules import heavy dependencies (Ray, diffusers) inside
their ``func`` so that ``rlft --help`` stays fast. Reporting commands print one JSON object on stdout with
``--json``; progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules that register sub-commands, in the order `rlft --help` lists them
COMMAND_MODULES = [
    "rlft.demo",  # rlft demo
    "rlft.models.pretrain",  # rlft pretrain
    "rlft.benchmarks",  # rlft bench ...
    "rlft.run.cli",  # rlft train / rlft sweep
    "rlft.run.jobs_cli",  # rlft submit / rlft jobs
    "rlft.run.sample_cli",  # rlft sample
    "rlft.run.check",  # rlft check
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlft",
        description="Fine-tune pretrained diffusion models with RL and stochastic control, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from rlft.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"rlft {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"rlft {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
