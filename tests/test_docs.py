"""Meta-tests of the documentation: it covers every hook, policy and command, and its build is strict.

* every hook specification is documented (Concepts or the plugin tutorial) and exercised by a rollout or
  by discovery;
* every built-in policy (registered by the ``cachepolicy`` distribution) has ``docs/policies/<name>.md``,
  listed in the nav, naming each of its parameters;
* every CLI subcommand appears in the CLI reference rendered by the mkdocs hook;
* the Self Forcing mapping table of the sliding-window page is what the engine does;
* the Quickstart's Python example runs;
* ``mkdocs build --strict`` passes, and fails on a planted broken reference.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import attrs
import pytest

from cachepolicy.hookspecs import DISCOVERY_HOOKS, ROLLOUT_HOOKS, hookimpl
from cachepolicy.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
HOOK_FILE = DOCS / "hooks" / "cli_reference.py"


def load_cli_hook():
    """The mkdocs hook module, imported from its file as mkdocs does."""
    spec = importlib.util.spec_from_file_location("cachepolicy_docs_cli_reference", HOOK_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subcommand_parsers(parser):
    """``{name: parser}`` of the parser's subcommands, read from argparse directly (not via the hook)."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


# ------------------------------------------------------------------------------------------------ hooks
@pytest.mark.parametrize("hook", [*ROLLOUT_HOOKS, *DISCOVERY_HOOKS])
def test_every_hookspec_is_documented(hook):
    text = (DOCS / "concepts.md").read_text() + (DOCS / "writing-a-policy.md").read_text()
    assert re.search(rf"`{hook}\b", text), f"hook {hook} is not documented in docs/concepts.md or writing-a-policy.md"


@attrs.frozen
class HookLog(Policy):
    """Implements every rollout hook and records the calls (a policy that changes nothing)."""

    name: ClassVar[str] = "hook-log"

    def new_state(self):
        return []

    def _log(self, session, hook):
        self.state(session).append(hook)

    @hookimpl
    def cachepolicy_session_start(self, session):
        self._log(session, "cachepolicy_session_start")

    @hookimpl
    def cachepolicy_chunk_start(self, session, chunk):
        self._log(session, "cachepolicy_chunk_start")

    @hookimpl
    def cachepolicy_after_step(self, session, step):
        assert step.x0.shape == step.x_t.shape
        self._log(session, "cachepolicy_after_step")

    @hookimpl
    def cachepolicy_candidate_ready(self, session, candidate):
        self._log(session, "cachepolicy_candidate_ready")

    @hookimpl
    def cachepolicy_before_commit(self, session, candidate):
        self._log(session, "cachepolicy_before_commit")

    @hookimpl
    def cachepolicy_select(self, session, view):
        # the chunk just committed is part of the view at select
        assert int(view.chunk[view.valid].max()) == session.chunk
        self._log(session, "cachepolicy_select")

    @hookimpl
    def cachepolicy_after_compaction(self, session, chunk):
        self._log(session, "cachepolicy_after_compaction")

    @hookimpl
    def cachepolicy_chunk_end(self, session, chunk):
        self._log(session, "cachepolicy_chunk_end")
        return {"hook_log_calls": len(self.state(session))}

    @hookimpl
    def cachepolicy_session_end(self, session):
        self._log(session, "cachepolicy_session_end")

    @hookimpl
    def cachepolicy_rope_positions(self, session, call):
        self._log(session, "cachepolicy_rope_positions")

    @hookimpl
    def cachepolicy_layer_request(self, session, call):
        from cachepolicy.layers import LayerRequest

        self._log(session, "cachepolicy_layer_request")
        return LayerRequest(layers=[0]) if call.first else None

    @hookimpl
    def cachepolicy_layer(self, session, layer):
        assert layer.index == 0 and layer.call.first and layer.query.shape == layer.key.shape
        self._log(session, "cachepolicy_layer")


def test_every_rollout_hook_is_exercised(tiny_wan):
    from cachepolicy.engine import RolloutConfig, Session

    implemented = {name for name in vars(HookLog) if name.startswith("cachepolicy_")}
    assert implemented == set(ROLLOUT_HOOKS), "a rollout hookspec was added or removed: update HookLog"
    policy = HookLog()
    session = Session(tiny_wan(), [policy], RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0]))
    result = session.run()
    calls = session.policy_state[policy.spec]
    assert set(calls) == set(ROLLOUT_HOOKS)
    steps = len(session.sampler.sigmas())
    assert calls.count("cachepolicy_after_step") == 2 * steps
    assert calls.count("cachepolicy_layer") == 2  # the first call of each chunk, layer 0 only
    assert calls.count("cachepolicy_layer_request") == calls.count("cachepolicy_rope_positions") == 2 * (steps + 1)
    assert calls[0] == "cachepolicy_session_start" and calls[-1] == "cachepolicy_session_end"
    assert "hook_log_calls" in result.trace[-1]


def builtin_entry_point_modules():
    """The modules named by the ``cachepolicy`` entry points of this checkout's ``pyproject.toml``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["project"]["entry-points"]["cachepolicy"]


@pytest.mark.parametrize("hook", DISCOVERY_HOOKS)
def test_every_discovery_hook_is_exercised_by_a_builtin(hook):
    """Some built-in entry-point module implements the hook, and discovery collects what it returns."""
    import importlib

    from cachepolicy.registry import discover

    modules = [importlib.import_module(value) for value in builtin_entry_point_modules().values()]
    providers = [m for m in modules if hasattr(m, hook)]
    assert providers, f"no built-in plugin implements {hook}"
    registry = discover(group="cachepolicy-docs-test-no-such-group", extra_plugins=providers)
    assert not registry.errors, registry.errors
    collected = getattr(registry, hook.removeprefix("cachepolicy_"))
    assert collected, f"discovery collected nothing from {hook}"


# --------------------------------------------------------------------------------------------- policies
def builtin_policies():
    from cachepolicy.registry import discover

    registry = discover()
    return {r.name: registry.policies[r.name] for r in registry.records
            if r.kind == "policy" and r.distribution == "cachepolicy" and not r.error}


def test_builtin_policies_are_found():
    assert {"full", "sliding-window", "attention-sink"} <= set(builtin_policies())


@pytest.mark.parametrize("name", sorted(builtin_policies()))
def test_every_builtin_policy_has_a_page(name):
    page = DOCS / "policies" / f"{name}.md"
    assert page.is_file(), f"built-in policy {name!r} has no docs page {page.relative_to(ROOT)}"
    assert f"policies/{name}.md" in MKDOCS_YML.read_text(), f"docs/policies/{name}.md is not in the mkdocs nav"
    text = page.read_text()
    cls = builtin_policies()[name]
    missing = [p for p in cls.parameters() if f"`{p}`" not in text]
    assert not missing, f"docs/policies/{name}.md does not document parameter(s) {missing}"


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_reference_lists_every_subcommand_and_option():
    from cachepolicy.cli import build_parser

    hook = load_cli_hook()
    parser = build_parser()
    rendered = hook.render(parser)
    subs = subcommand_parsers(parser)
    assert subs, "the CLI has no subcommands?"
    for name, sub in subs.items():
        assert f"## `{parser.prog} {name}`" in rendered, f"subcommand {name!r} missing from the CLI reference"
        for action in sub._actions:
            for option in action.option_strings:
                assert option in rendered, f"option {option} of {name!r} missing from the CLI reference"
    assert sorted(hook.subcommands(parser)) == sorted(subs)


def test_cli_reference_picks_up_a_new_subcommand():
    from cachepolicy.cli import build_parser

    parser = build_parser()
    sub_action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    extra = sub_action.add_parser("frobnicate", help="a command added after the docs were written")
    extra.add_argument("--level", type=int, help="how much")
    rendered = load_cli_hook().render(parser)
    assert "## `cachepolicy frobnicate`" in rendered
    assert "a command added after the docs were written" in rendered
    assert "--level" in rendered


def test_cli_page_marker_is_replaced_and_required():
    hook = load_cli_hook()
    text = (DOCS / "cli.md").read_text()
    assert hook.MARKER in text
    page = SimpleNamespace(file=SimpleNamespace(src_uri="cli.md"))
    out = hook.on_page_markdown(text, page=page, config=None, files=None)
    assert hook.MARKER not in out
    for name in subcommand_parsers(__import__("cachepolicy.cli", fromlist=["build_parser"]).build_parser()):
        assert f"`cachepolicy {name}`" in out
    other = SimpleNamespace(file=SimpleNamespace(src_uri="index.md"))
    assert hook.on_page_markdown("untouched", page=other, config=None, files=None) == "untouched"
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError):
        hook.on_page_markdown("# CLI without the marker", page=page, config=None, files=None)


# --------------------------------------------------------------------------------- claims of the pages
def _frames(cell: str) -> list[int]:
    """``"0, 1, 2, 6..8"`` -> ``[0, 1, 2, 6, 7, 8]``."""
    frames: list[int] = []
    for part in re.split(r"[,+]", cell.replace("(none)", "")):
        part = part.strip()
        if not part:
            continue
        if ".." in part:
            a, b = part.split("..")
            frames.extend(range(int(a), int(b) + 1))
        else:
            frames.append(int(part))
    return sorted(frames)


def attended_frames(adapter, spec: str, num_chunks: int) -> dict[int, list[int]]:
    """Per chunk: the frames it attends to (resident context before it + its own frames)."""
    from cachepolicy.api import build_policies
    from cachepolicy.engine import RolloutConfig, Session

    session = Session(adapter, build_policies(spec), RolloutConfig(num_chunks=num_chunks, prompts=["a"], seeds=[0]))
    frames_per_chunk = adapter.info.frames_per_chunk
    context: list[int] = []
    attended: dict[int, list[int]] = {}

    def on_chunk(record):
        chunk = record["chunk"]
        attended[chunk] = sorted(context) + list(range(chunk * frames_per_chunk, (chunk + 1) * frames_per_chunk))
        view = session.cache.view()
        context[:] = view.frame[0][view.valid[0]].unique().tolist()

    session.on_chunk = on_chunk
    session.run()
    return attended


def self_forcing_attended(local_attn_size: int, sink_size: int, chunk: int, frames_per_chunk: int = 3) -> list[int]:
    """Self Forcing's attended frames for a chunk (docs/policies/sliding-window.md, from its cache code)."""
    start = chunk * frames_per_chunk
    recent = range(max(sink_size, start + frames_per_chunk - (local_attn_size - sink_size)), start + frames_per_chunk)
    return sorted(set(range(sink_size)) | set(recent))


def test_self_forcing_worked_example_table_matches_the_engine(tiny_wan):
    text = (DOCS / "policies" / "sliding-window.md").read_text()
    table = text[text.index("Worked example, `A = 9, S = 3`"):]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", table, flags=re.M)
    assert len(rows) == 7
    attended = attended_frames(tiny_wan(), "attention-sink:frames=3+sliding-window:frames=3", 7)
    for chunk, _, self_forcing, ours in rows:
        chunk = int(chunk)
        assert _frames(self_forcing) == self_forcing_attended(9, 3, chunk), f"Self Forcing column, chunk {chunk}"
        assert _frames(ours) == attended[chunk], f"cachepolicy column, chunk {chunk}"


@pytest.mark.parametrize("local_attn_size,sink_size", [(9, 3), (10, 3), (12, 3), (15, 3), (9, 0), (21, 0)])
def test_self_forcing_mapping_formula(tiny_wan, local_attn_size, sink_size):
    frames_per_chunk = 3
    window = local_attn_size - sink_size - frames_per_chunk
    spec = f"sliding-window:frames={window}"
    if sink_size:
        spec = f"attention-sink:frames={sink_size}+" + spec
    attended = attended_frames(tiny_wan(), spec, 10)
    for chunk, frames in attended.items():
        assert frames == self_forcing_attended(local_attn_size, sink_size, chunk), (spec, chunk)


def test_quickstart_python_example_runs(tmp_path, monkeypatch):
    text = (DOCS / "quickstart.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the Quickstart has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "quickstart.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert tuple(namespace["result"].latents.shape) == (1, 4, 24, 8, 8)
    assert namespace["result"].trace[-1]["cache_tokens"] == 144
    assert (tmp_path / "runs" / "a" / "run.json").is_file()


# ---------------------------------------------------------------------------------------------- build
def _mkdocs_available() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


needs_mkdocs = pytest.mark.skipif(
    _mkdocs_available() is not None,
    reason=f"mkdocs is not installed ({_mkdocs_available()} missing); install the 'docs' extra: pip install -e '.[docs]'",
)


def mkdocs_build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


@needs_mkdocs
def test_mkdocs_build_strict_passes(tmp_path):
    result = mkdocs_build(MKDOCS_YML, tmp_path / "site", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "<!-- cli-reference -->" not in cli  # the marker was replaced by the rendered reference
    assert "cachepolicy run" in cli


def copy_docs(tmp_path: Path) -> Path:
    """docs/ and mkdocs.yml copied to ``tmp_path``; the package and quoted files still come from the checkout."""
    shutil.copytree(DOCS, tmp_path / "docs")
    config = MKDOCS_YML.read_text()
    config = config.replace("paths: [.]", f"paths: [{ROOT}]")
    config = config.replace("base_path: [!relative $config_dir]", f"base_path: [{ROOT}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    return tmp_path / "mkdocs.yml"


@needs_mkdocs
@pytest.mark.parametrize("planted,expected", [
    ("See [the missing page](no-such-page.md).", "no-such-page.md"),
    ("See [a missing section](faq.md#no-such-section).", "no-such-section"),
    ("::: cachepolicy.no_such_module", "cachepolicy.no_such_module"),
])
def test_mkdocs_build_strict_fails_on_a_broken_reference(tmp_path, planted, expected):
    config = copy_docs(tmp_path)
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\n\n" + planted + "\n")
    result = mkdocs_build(config, tmp_path / "site", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert expected in output, output
