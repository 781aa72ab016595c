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
import operator
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator

__all__ = ["Setting", "register", "get", "set", "override", "all_settings", "describe",
           "reload_environment", "finite_us", "seconds", "positive_seconds", "one_of", "nonneg_int",
           "MAX_US", "MAX_S"]

# Upper bounds of the time types below: the C engine takes nanoseconds as int64
# (9.2e18 ns), and these stay far inside it.
MAX_US = 1e12   # microseconds (~11.6 days)
MAX_S = 1e9     # seconds (~31.7 years)


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _in_range(value: Any, lo_open: bool, hi: float, what: str) -> float:
    """``value`` as a finite float in [0, hi] (or (0, hi] with lo_open), else ValueError
    'must be a finite number {what}'."""
    v = _number(value)
    if not math.isfinite(v) or not (0 < v if lo_open else 0 <= v) or v > hi:
        raise ValueError(f"must be a finite number {what}, got {value!r}")
    return v


def finite_us(value: Any) -> float:
    """A settings type shared by the layers: a finite number >= 0 (microseconds), at most
    MAX_US."""
    return _in_range(value, False, MAX_US, f">= 0 and <= {MAX_US:g} (µs)")


def seconds(value: Any) -> float:
    """A settings type: a finite number of seconds >= 0, at most MAX_S."""
    return _in_range(value, False, MAX_S, f"of seconds >= 0 and <= {MAX_S:g}")


def positive_seconds(value: Any) -> float:
    """A settings type: a finite number of seconds > 0, at most MAX_S."""
    return _in_range(value, True, MAX_S, f"of seconds > 0 and <= {MAX_S:g}")


def nonneg_int(value: Any) -> int:
    """A settings type: a whole number >= 0 (at most 2**31 - 1)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a whole number >= 0, got {value!r}")
    try:
        v = int(value, 0) if isinstance(value, str) else int(value)
        ok = (not isinstance(value, float) or value == v) and 0 <= v <= 2**31 - 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"must be a whole number >= 0 (at most {2**31 - 1}), got {value!r}")
    return v


def one_of(*choices: str) -> Callable[[Any], str]:
    """A settings type: one of the given strings (e.g. a mode name)."""
    allowed = tuple(choices)

    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}; got {value!r}")
        return value
    parse.__name__ = f"one_of{allowed!r}"
    return parse


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
        """The value of ``raw`` (an environment string, or a Python value from set() /
        override()), checked as strictly from Python as from the environment."""
        if isinstance(raw, str):
            conv = _parse_bool if self.type is bool else self.type
            try:
                return conv(raw)
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"{self.env}={raw!r}: {e}") from None
        try:
            return self._parse_value(raw)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"setting {self.name} ({self.env})={raw!r}: {e}") from None

    def _parse_value(self, raw: Any) -> Any:
        if raw is None:
            if self.default is None:
                return None
            raise ValueError("None is not a value of this setting (reset it with "
                             "override() or reload_environment())")
        if self.type is bool:
            if isinstance(raw, bool):
                return raw
            try:  # 0/1 (also numpy's bools and integers); never nan, -1, [1]
                if isinstance(raw, (int, float)) or hasattr(raw, "dtype"):
                    if bool(raw == 0) or bool(raw == 1):
                        return bool(raw)
            except (TypeError, ValueError):
                pass
            raise ValueError("not a boolean (True/False, 0/1, or a string such as 'on')")
        if self.type is int:
            if isinstance(raw, bool):
                raise ValueError("expected an integer, got a bool")
            if isinstance(raw, float):
                if not raw.is_integer():
                    raise ValueError("expected an integer")
                return int(raw)
            if not hasattr(raw, "__index__"):
                raise ValueError(f"expected an integer, got {type(raw).__name__}")
            return operator.index(raw)
        if self.type is str:
            if isinstance(raw, os.PathLike):
                return os.fspath(raw)
            raise ValueError(f"expected a string, got {type(raw).__name__}")
        return self.type(raw)


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
    new = {k: _lookup(k).parse(v) for k, v in kw.items()}  # all checked before any applies
    old = {}
    for k, v in new.items():
        old[k] = _values.get(k, _missing)
        _values[k] = v
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
