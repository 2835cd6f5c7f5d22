"""Entry-point discovery: built-ins through the same group, third-party plugins, broken plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cachepolicy.registry import discover

PLUGIN = '''
"""Throwaway third-party policy: keep only the most recent chunk (for tests)."""
from typing import ClassVar
import attrs
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy, Selection


@attrs.frozen
class LastChunkOnly(Policy):
    name: ClassVar[str] = "last-chunk-only"
    summary: ClassVar[str] = "keep only the newest chunk"

    @hookimpl
    def cachepolicy_select(self, session, view):
        return Selection(drop=view.valid & (view.chunk < session.chunk))


@hookimpl
def cachepolicy_policies():
    return [LastChunkOnly]
'''


def make_distribution(root: Path) -> Path:
    """A minimal installed distribution (module + dist-info) providing one good and one broken plugin."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "throwaway_plugin.py").write_text(PLUGIN)
    (root / "throwaway_broken.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    info = root / "throwaway_policies-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-policies\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [cachepolicy]
        last-chunk-only = throwaway_plugin
        broken = throwaway_broken
    """))
    return root


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    root = make_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("throwaway_plugin", "throwaway_broken"):
        sys.modules.pop(name, None)


def test_builtins_come_through_the_entry_point_group(registry):
    by_name = {r.name: r for r in registry.records}
    for name in ("full", "sliding-window", "attention-sink"):
        assert by_name[name].kind == "policy"
        assert by_name[name].distribution == "cachepolicy"
        assert by_name[name].entry_point.startswith("cachepolicy.plugins.")
    assert by_name["tiny-wan"].kind == "model" and by_name["tiny-wan"].adapter == "wan"


def test_third_party_plugin_is_discovered_and_a_broken_one_reported(throwaway):
    registry = discover()
    assert "last-chunk-only" in registry.policies
    by_name = {r.name: r for r in registry.records}
    good = by_name["last-chunk-only"]
    assert (good.distribution, good.version, good.hooks) == ("throwaway-policies", "1.2.3", ("cachepolicy_select",))
    broken = by_name["broken"]
    assert broken.kind == "plugin" and "RuntimeError: this plugin is broken on purpose" in broken.error
    assert {"full", "sliding-window", "attention-sink"} <= set(registry.policies)  # the others still load


def test_third_party_policy_is_usable_in_a_run(throwaway, tiny_wan):
    from cachepolicy.engine import RolloutConfig, Session
    from cachepolicy.policy import build_policies

    registry = discover()
    policies = build_policies("last-chunk-only", registry.policies)
    session = Session(tiny_wan(), policies, RolloutConfig(num_chunks=3, prompts=["x"], seeds=[0]))
    result = session.run()
    assert [r["cache_tokens"] for r in result.trace] == [48, 48, 48]
    assert result.trace[-1]["dropped_tokens"] == {"last-chunk-only": 48}


def _cli(args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cachepolicy.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_plugins_json_lists_broken_plugin_and_does_not_crash(throwaway):
    proc = _cli(["plugins", "--json"], {"PYTHONPATH": str(throwaway)})
    assert proc.returncode == 0, proc.stderr
    records = {r["name"]: r for r in json.loads(proc.stdout)}
    assert records["broken"]["error"].startswith("RuntimeError")
    assert records["last-chunk-only"]["distribution"] == "throwaway-policies"
    for record in records.values():
        assert {"name", "kind", "distribution", "version", "hooks", "error"} <= set(record)
    table = _cli(["plugins"], {"PYTHONPATH": str(throwaway)})
    assert table.returncode == 0 and "ERROR: RuntimeError" in table.stdout


def test_cli_plugins_does_not_import_torch():
    code = ("import sys; from cachepolicy.cli import main; main(['plugins', '--json']); "
            "heavy = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_asking_for_a_broken_plugin_says_it_failed(throwaway):
    import cachepolicy.registry as registry_module
    from cachepolicy.api import build_policies
    from cachepolicy.errors import PluginLoadError

    registry_module.get_registry(refresh=True)
    try:
        with pytest.raises(PluginLoadError, match="plugin 'broken' is installed but failed to load: RuntimeError"):
            build_policies("broken")
    finally:
        registry_module._REGISTRY = None
