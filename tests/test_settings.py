"""gpuwire.settings: parsing, precedence, errors, and the docs page staying complete."""
import os
import pathlib
import subprocess
import sys

import pytest

import gpuwire
import gpuwire.transport  # noqa: F401  (registers transport settings)
from gpuwire import settings

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def _import_layers():
    for mod in ("gpuwire.gds", "gpuwire.rpc", "gpuwire.rpc.client", "gpuwire.rpc.server"):
        try:
            __import__(mod)
        except ImportError:
            pass


def test_every_registered_setting_is_documented():
    _import_layers()
    text = DOCS.read_text()
    missing = [s.env for s in settings.all_settings().values() if s.env not in text]
    assert not missing, f"docs/settings.md lacks {missing}"


def test_set_override_and_get():
    before = settings.get("spin_us")
    with settings.override(spin_us=7):
        assert settings.get("spin_us") == 7.0
        with settings.override(spin_us="3.5"):
            assert settings.get("spin_us") == 3.5
        assert settings.get("spin_us") == 7.0
    assert settings.get("spin_us") == before


def test_unknown_setting_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown gpuwire setting 'nope'.*spin_us"):
        settings.get("nope")


def test_worker_takes_spin_from_settings():
    from gpuwire import transport as t
    ctx = t.Context({"TLS": "tcp,self"})
    try:
        with settings.override(spin_us=0):
            w = ctx.worker()
            assert w.spin_us == 0
            w.close()
    finally:
        ctx.close()


def test_bad_environment_value_names_the_variable():
    env = dict(os.environ, GPUWIRE_SPIN_US="abc")
    code = "import gpuwire.transport as t; from gpuwire import settings; settings.get('spin_us')"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode != 0
    assert "GPUWIRE_SPIN_US='abc'" in p.stderr


def test_environment_value_is_used():
    env = dict(os.environ, GPUWIRE_CONNECT_TIMEOUT_S="2.5")
    code = "import gpuwire.transport; from gpuwire import settings; print(settings.get('connect_timeout_s'))"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.stdout.strip() == "2.5", p.stderr


# ------------------------------------------------------------ validation (audit)


@pytest.mark.parametrize("var,value", [
    ("GPUWIRE_CONNECT_TIMEOUT_S", "-1"), ("GPUWIRE_CONNECT_TIMEOUT_S", "nan"),
    ("GPUWIRE_CONNECT_TIMEOUT_S", "inf"), ("GPUWIRE_CONNECT_TIMEOUT_S", "1e30"),
    ("GPUWIRE_CONNECT_TIMEOUT_S", "0"),
    ("GPUWIRE_OP_TIMEOUT_S", "-1"), ("GPUWIRE_OP_TIMEOUT_S", "nan"),
    ("GPUWIRE_OP_TIMEOUT_S", "inf"), ("GPUWIRE_OP_TIMEOUT_S", "1e30"),
    ("GPUWIRE_SPIN_US", "1e30"), ("GPUWIRE_EMULATE_RTT_US", "1e30"),
])
def test_out_of_range_transport_settings_name_the_variable(var, value):
    import gpuwire.transport  # noqa: F401
    name = var[len("GPUWIRE_"):].lower()
    s = settings.all_settings()[name]
    with pytest.raises(ValueError, match=f"{var}='{value}'"):
        s.parse(value)
    with pytest.raises(ValueError, match=name):
        settings.set(name, float(value))
    assert settings.all_settings()[name].parse("5") == 5.0


def test_transport_time_settings_in_range_still_work():
    assert settings.all_settings()["op_timeout_s"].parse("0") == 0.0     # 0: no timeout
    assert settings.all_settings()["connect_timeout_s"].parse("0.25") == 0.25
    with settings.override(op_timeout_s=2.5, spin_us=0, emulate_rtt_us=0):
        assert settings.get("op_timeout_s") == 2.5


def test_failing_override_applies_nothing():
    before = (settings.get("spin_us"), settings.get("op_timeout_s"))
    with pytest.raises(ValueError):
        with settings.override(spin_us=3, op_timeout_s="nope"):
            pass
    assert (settings.get("spin_us"), settings.get("op_timeout_s")) == before
    with pytest.raises(KeyError):
        with settings.override(spin_us=3, no_such_setting=1):
            pass
    assert settings.get("spin_us") == before[0]


def test_python_values_are_checked_as_strictly_as_the_environment():
    int_name = next(n for n, s in settings.all_settings().items() if s.type is int)
    bool_name = next(n for n, s in settings.all_settings().items() if s.type is bool)
    str_name = "ucx_libdir"
    for name in ("spin_us", int_name, bool_name, str_name):
        with pytest.raises(ValueError, match=name):
            settings.set(name, None)
    with pytest.raises(ValueError, match=int_name):
        settings.set(int_name, 2.5)                 # the environment rejects "2.5" too
    with pytest.raises(ValueError, match=int_name):
        settings.set(int_name, True)
    with settings.override(**{int_name: 4.0}):      # integral floats are fine
        assert settings.get(int_name) == 4 and type(settings.get(int_name)) is int
    for bad in (float("nan"), -1, [1], 2, "maybe"):
        with pytest.raises(ValueError, match=f"(?i){bool_name}"):
            settings.set(bool_name, bad)
    with settings.override(**{bool_name: 0}):
        assert settings.get(bool_name) is False
    with pytest.raises(ValueError, match=str_name):
        settings.set(str_name, 5)
    with pytest.raises(ValueError, match="spin_us"):
        settings.set("spin_us", True)


def test_one_of_and_time_types():
    mode = settings.one_of("auto", "on", "off")
    assert mode("on") == "on"
    with pytest.raises(ValueError, match="one of auto, on, off"):
        mode("abc")
    s = settings.Setting("demo_mode", "auto", mode, "demo")
    with pytest.raises(ValueError, match="GPUWIRE_DEMO_MODE='abc'"):
        s.parse("abc")
    for bad in (-1, float("nan"), float("inf"), 1e30, True):
        with pytest.raises(ValueError):
            settings.seconds(bad)
        with pytest.raises(ValueError):
            settings.finite_us(bad)
    with pytest.raises(ValueError):
        settings.positive_seconds(0)
    assert settings.seconds(0) == 0.0 and settings.positive_seconds(1) == 1.0
