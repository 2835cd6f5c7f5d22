"""MkDocs hook: render the CLI reference from the CLI itself.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; at build time it is replaced by the
``--help`` text of ``cachepolicy`` and of every subcommand, taken from
:func:`cachepolicy.cli.build_parser`. A subcommand added to the parser appears in the docs without any
edit here. The build fails if the marker is missing from ``cli.md``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
HELP_WIDTH = 100


@contextmanager
def _fixed_width(columns: int) -> Iterator[None]:
    """argparse wraps help to ``$COLUMNS``; pin it so the page does not depend on the build terminal."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def iter_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), summary: str = ""
                  ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Yield ``(command path, parser, one-line help)`` for the parser and every (nested) subcommand."""
    yield path, parser, summary or parser.description or ""
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield from iter_commands(sub, path + (name,), helps.get(name, ""))


def subcommands(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Names of every subcommand, nested ones as ``"a b"``."""
    if parser is None:
        from cachepolicy.cli import build_parser

        parser = build_parser()
    return [" ".join(path) for path, _, _ in iter_commands(parser) if path]


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown for the CLI reference: an index of commands, then each command's ``--help``."""
    if parser is None:
        from cachepolicy.cli import build_parser

        parser = build_parser()
    prog = parser.prog
    commands = list(iter_commands(parser))
    lines = ["## Commands", "", "| Command | What it does |", "| --- | --- |"]
    for path, _, summary in commands:
        if path:
            name = " ".join((prog, *path))
            anchor = "-".join((prog, *path))
            lines.append(f"| [`{name}`](#{anchor}) | {summary.replace('|', '/')} |")
    lines.append("")
    with _fixed_width(HELP_WIDTH):
        for path, sub, _ in commands:
            name = " ".join((prog, *path))
            anchor = "-".join((prog, *path))
            lines += [f"## `{name}` {{ #{anchor} }}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - mkdocs hook signature
    """Replace the marker in ``cli.md`` by the rendered reference."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} must contain the marker {MARKER!r} where the CLI reference goes")
    return markdown.replace(MARKER, render())
