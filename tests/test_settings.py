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
