"""The `gpuwire` console script.

Subcommands are contributed by modules: each exposes ``add_parser(subparsers)``
that registers its parser and sets ``func`` (called with the parsed args, returns
an exit code). Imports happen lazily so `gpuwire info` works without optional
dependencies.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, attribute) pairs; each module's add_parser registers one subcommand
_TOP = [
    ("gpuwire.info", "add_parser"),
    ("gpuwire.rpc.apigen", "add_parser"),   # apigen
    ("gpuwire.rpc.cli", "add_parser"),      # serve
]
# `gpuwire bench <name>`: modules under gpuwire.bench
_BENCH = ["transport", "rpc", "pinned", "gds"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpuwire", description="GPUs as a pool reachable over the network")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod, attr in _TOP:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("gpuwire"):
                continue  # layer not present in this build
            raise
        try:
            getattr(m, attr)(sub)
        except argparse.ArgumentError:
            pass  # already registered by another module (e.g. rpc.cli also adds apigen)
    b = sub.add_parser("bench", help="latency/bandwidth sweeps (transport, rpc, pinned, gds)")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH")
    for name in _BENCH:
        try:
            m = importlib.import_module(f"gpuwire.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("gpuwire"):
                continue
            raise
        m.add_parser(bsub)
    b.set_defaults(func=lambda a: (b.print_help(), 2)[1])
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
