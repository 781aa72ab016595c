"""The one way a bench module becomes `gpuwire bench NAME` and `python -m gpuwire.bench.NAME`."""
from __future__ import annotations

import argparse
import sys


def subcommand(subparsers, name: str, help: str, doc: str, add_arguments, run) -> argparse.ArgumentParser:
    """Register ``gpuwire bench <name>``: the module's options, its docstring as description."""
    p = subparsers.add_parser(name, help=help, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(name: str, add_arguments, run, argv=None) -> int:
    """``python -m gpuwire.bench.<name>``: parse ``argv`` and run the bench."""
    ap = argparse.ArgumentParser(prog=f"python -m gpuwire.bench.{name}")
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run a bench module: python -m gpuwire.bench.transport (or rpc, pinned, gds)")
