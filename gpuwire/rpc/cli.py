"""`gpuwire serve` (the RPC server) and `gpuwire apigen` (spec tooling, from gpuwire.rpc.apigen)."""
from __future__ import annotations

import argparse
import logging
import math
import sys


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .. import transport as t
    from .server import serve
    kw = {}
    try:
        # (every bad argument is a one-line message and exit status 2, found at start)
        if args.va_gib is not None:
            kw["va_gib"] = args.va_gib
        if args.isolation is not None:
            kw["isolation"] = args.isolation
        if args.cpu_mem_gib is not None:
            if not (math.isfinite(args.cpu_mem_gib) and args.cpu_mem_gib > 0):
                raise ValueError(f"--cpu-mem-gib must be a positive number of GiB, got {args.cpu_mem_gib!r}")
            kw["mem_bytes"] = int(args.cpu_mem_gib * (1 << 30))
            from .executors.cpu import _host_ram   # (also checked where the executor starts)
            if kw["mem_bytes"] > _host_ram():
                raise ValueError(f"--cpu-mem-gib {args.cpu_mem_gib:g} is more than this host's RAM "
                                 f"({_host_ram() / (1 << 30):.1f} GiB)")
        return serve(args.listen, executor=args.executor, token=args.token, token_file=args.token_file,
                     no_auth=args.no_auth, device=args.device, data_roots=args.data_root or [], tls=args.tls,
                     ready_fd=sys.stdout if args.ready_stdout else None, cpu_kernels=args.cpu_kernels or [],
                     **kw)
    except (ValueError, OSError, t.TransportError) as e:
        print(f"gpuwire serve: {e}", file=sys.stderr)
        return 2


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="0.0.0.0:13371", metavar="HOST:PORT",
                   help="address to listen on (port 0 picks one; default 0.0.0.0:13371)")
    p.add_argument("--executor", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: the CUDA driver; cpu: host RAM as device memory and Python kernels (CI, no GPU)")
    p.add_argument("--token", help="shared secret clients must present (or GPUWIRE_RPC_TOKEN)")
    p.add_argument("--token-file", help="file holding the shared secret")
    p.add_argument("--no-auth", action="store_true", help="accept clients without a token (trusted networks only)")
    p.add_argument("--device", type=int, default=0, help="default CUDA device ordinal")
    p.add_argument("--data-root", action="append", metavar="DIR",
                   help="directory clients may have files read from into device memory (gds: gwFileRead, "
                        "gpuwire.gds.remote; repeatable; relative client paths are looked up in this order). "
                        "Without one every file read is refused")
    p.add_argument("--tls", default=None, help="UCX_TLS for the server (default: setting rpc_tls / UCX's choice)")
    p.add_argument("--isolation", choices=("process", "thread"), default=None,
                   help="process: a worker process per session (default for gpu: a GPU fault poisons every "
                        "context of its process); thread: sessions share this process (default for cpu)")
    p.add_argument("--va-gib", type=float, default=None, help="device VA range reserved per session (GiB)")
    p.add_argument("--cpu-mem-gib", type=float, default=None, help="CPU executor: device memory size (GiB)")
    p.add_argument("--cpu-kernels", action="append", metavar="MODULE",
                   help="CPU executor: import MODULE, which registers kernels (repeatable)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.add_argument("--ready-stdout", action="store_true", help=argparse.SUPPRESS)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve this machine's GPU (or the CPU executor) to gpuwire clients",
                              description="Run the gpuwire RPC server: clients connect with "
                                          "gpuwire.connect('HOST:PORT', token=...).")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)
    try:
        from . import apigen
    except ModuleNotFoundError as e:  # pragma: no cover - apigen needs pyyaml only
        if not (e.name or "").startswith("gpuwire"):
            raise
    else:
        apigen.add_parser(subparsers)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpuwire.rpc.cli")
    add_serve_arguments(ap)
    args = ap.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
