"""Runtime settings: every GPUWIRE_* variable in one place (docs/settings.md lists them).

Each setting has a default, can be set through the environment before import,
and from Python at any time::

    import gpuwire
    gpuwire.settings.set("spin_us", 20)          # this process, from now on
    with gpuwire.settings.override(spin_us=0):   # scoped
        ...
    gpuwire.settings.get("spin_us")

Layers register their own settings with :func:`register` in their own module;
nothing here imports a layer.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator

__all__ = ["Setting", "register", "get", "set", "override", "all_settings", "describe",
           "reload_environment", "finite_us"]


def finite_us(value: Any) -> float:
    """A settings type shared by the layers: a finite number >= 0 (microseconds)."""
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"must be a finite number >= 0, got {value!r}")
    return v


def _parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass
class Setting:
    name: str            # short name, e.g. "spin_us"; env var GPUWIRE_SPIN_US
    default: Any
    type: Callable[[str], Any]
    doc: str
    layer: str = "core"

    @property
    def env(self) -> str:
        return "GPUWIRE_" + self.name.upper()

    def parse(self, raw: Any) -> Any:
        if isinstance(raw, str):
            conv = _parse_bool if self.type is bool else self.type
            try:
                return conv(raw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{self.env}={raw!r}: {e}") from None
        if self.type is bool:
            return bool(raw)
        if raw is None:
            return None
        try:
            return self.type(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"setting {self.name}={raw!r}: {e}") from None


_lock = threading.Lock()
_registry: Dict[str, Setting] = {}
_values: Dict[str, Any] = {}
_env_cache: Dict[str, Any] = {}


def register(name: str, default: Any, type: Callable[[str], Any], doc: str, layer: str = "core") -> Setting:
    s = Setting(name, default, type, doc, layer)
    with _lock:
        if name in _registry:
            return _registry[name]
        _registry[name] = s
    return s


def _lookup(name: str) -> Setting:
    try:
        return _registry[name]
    except KeyError:
        raise KeyError(f"unknown gpuwire setting {name!r}; known: {', '.join(sorted(_registry))}") from None


def get(name: str) -> Any:
    """The value in force: set()/override() first, else the environment (read once,
    at first use), else the default."""
    try:
        return _values[name]
    except KeyError:
        pass
    try:
        return _env_cache[name]
    except KeyError:
        pass
    s = _lookup(name)
    raw = os.environ.get(s.env)
    value = s.default if raw is None else s.parse(raw)
    _env_cache[name] = value
    return value


def reload_environment() -> None:
    """Forget cached environment values (after changing os.environ at run time)."""
    _env_cache.clear()


def set(name: str, value: Any) -> None:  # noqa: A001 - mirrors kvikio.defaults.set
    s = _lookup(name)
    with _lock:
        _values[name] = s.parse(value)


@contextlib.contextmanager
def override(**kw: Any) -> Iterator[None]:
    old = {}
    for k, v in kw.items():
        s = _lookup(k)
        old[k] = _values.get(k, _missing)
        _values[k] = s.parse(v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is _missing:
                _values.pop(k, None)
            else:
                _values[k] = v


_missing = object()


def all_settings() -> Dict[str, Setting]:
    return dict(_registry)


def describe() -> str:
    rows = []
    for s in sorted(_registry.values(), key=lambda s: (s.layer, s.name)):
        rows.append(f"{s.env:32} = {get(s.name)!r:12} (default {s.default!r}) {s.doc}")
    return "\n".join(rows)
