"""`gpuwire info`: versions, UCX transports and devices, GPUs, RDMA devices, kvikio mode."""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
from typing import Any, Dict, List


def ucx_summary() -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    try:
        from gpuwire import transport as t
    except Exception as e:
        return {"error": str(e)}
    out["runtime"] = ".".join(map(str, t.runtime_version()))
    out["built_against"] = ".".join(map(str, t.built_version()))
    out["library"] = t.library_path()
    out["loaded_via"] = t.load_source
    ctx = t.Context()
    try:
        out["transports"] = _transports(ctx.info())
    finally:
        ctx.close()
    out["UCX_TLS"] = os.environ.get("UCX_TLS", "(default: all)")
    return out


def _transports(info_text: str) -> List[str]:
    """Resource lines of ucp_context_print_info: '#   resource N :  md M  dev D  flags -- TL/DEV'."""
    seen: List[str] = []
    for line in info_text.splitlines():
        if "resource" in line and "--" in line:
            tl = line.rsplit("--", 1)[1].strip()
            if tl and tl not in seen:
                seen.append(tl)
    return seen


def gpu_summary() -> Any:
    """GPUs through the CUDA driver (cuda.bindings), or nvidia-smi, or 'none'."""
    try:
        from cuda.bindings import driver as cu
        err, = cu.cuInit(0)
        if err == cu.CUresult.CUDA_SUCCESS:
            err, n = cu.cuDeviceGetCount()
            gpus = []
            for i in range(n):
                _, dev = cu.cuDeviceGet(i)
                _, name = cu.cuDeviceGetName(64, dev)
                _, mem = cu.cuDeviceTotalMem(dev)
                gpus.append({"index": i, "name": name.split(b"\0")[0].decode(), "memory_GiB": round(mem / 2**30, 1)})
            _, ver = cu.cuDriverGetVersion()
            return {"driver_api": ver, "devices": gpus}
        return f"none (cuInit: {err.name})"
    except ImportError:
        pass
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"none ({e.__class__.__name__}: {e})"
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            return {"nvidia-smi": r.stdout.strip().splitlines()}
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    return "none"


def rdma_summary() -> Any:
    """RDMA devices through pyverbs where installed, else sysfs; 'none' when there are none."""
    try:
        import pyverbs.device as d  # type: ignore
        devs = d.get_device_list()
        names = [x.name.decode() if isinstance(x.name, bytes) else str(x.name) for x in devs]
        return {"pyverbs": names} if names else "none (pyverbs: no devices)"
    except ImportError:
        pass
    except Exception as e:  # pragma: no cover
        return f"none (pyverbs: {e})"
    names = [os.path.basename(p) for p in glob.glob("/sys/class/infiniband/*")]
    return {"sysfs": names, "note": "pyverbs not installed"} if names else "none (pyverbs not installed; /sys/class/infiniband empty)"


def kvikio_summary() -> Any:
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return "not installed (gpuwire.gds uses its POSIX backend)"
    except Exception as e:  # pragma: no cover
        return f"unusable ({e.__class__.__name__}: {e})"
    try:
        from gpuwire.gds import backends
        return backends.kvikio_mode()
    except Exception as e:
        return f"installed, mode unknown ({e.__class__.__name__}: {e})"


def collect() -> Dict[str, Any]:
    import gpuwire
    from gpuwire import settings
    info: Dict[str, Any] = {
        "gpuwire": gpuwire.__version__,
        "python": f"{platform.python_version()} ({platform.machine()})",
        "ucx": ucx_summary(),
        "gpus": gpu_summary(),
        "rdma": rdma_summary(),
        "kvikio": kvikio_summary(),
    }
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except Exception:
        info["cupy"] = "not installed"
    info["settings"] = {s.env: settings.get(n) for n, s in sorted(settings.all_settings().items())}
    return info


def _print(d: Dict[str, Any], indent: int = 0) -> None:
    pad = "  " * indent
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{pad}{k}:")
            _print(v, indent + 1)
        elif isinstance(v, list):
            print(f"{pad}{k}: " + (", ".join(map(str, v)) if v else "none"))
        else:
            print(f"{pad}{k}: {v}")


def run(args: argparse.Namespace) -> int:
    # import the layers so their settings are registered
    for mod in ("gpuwire.transport", "gpuwire.rpc", "gpuwire.gds"):
        try:
            __import__(mod)
        except Exception:
            pass
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        _print(info)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, UCX transports/devices, GPUs, RDMA, kvikio mode")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
