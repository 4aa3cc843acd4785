"""Every ``spiking-lm ...`` command in the code blocks of README.md and docs/*.md parses against its parser.

A command is parsed, not run: ``jsonargparse.capture_parser`` stops ``spiking_lm.cli.run`` at the parser it
builds for the command (LightningCLI's for fit/validate/test, the function signatures' for the others), and
the command line goes through that parser, config files included. So a renamed option, a removed command or a
config file that is gone fails here instead of in a reader's shell.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from argparse import ArgumentError
from functools import cache
from pathlib import Path

import pytest
from jsonargparse import capture_parser

from spiking_lm.cli import COMMANDS, run
from spiking_lm.config import ModelConfig, NeuronConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LIGHTNING = ("fit", "validate", "test")  # LightningCLI's parser takes the subcommand itself


def commands(text: str) -> list[list[str]]:
    """The ``spiking-lm`` command lines of the fenced code blocks of a markdown text, as argument lists."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True) if "spiking-lm" in line else []
            while "spiking-lm" in words:  # possibly after `pip install ... &&` or `$`
                words = words[words.index("spiking-lm") + 1 :]
                end = next(
                    (
                        i
                        for i, w in enumerate(words)
                        if w in ("&&", "||", ";", "|") or w[:1] in "<>" or w.startswith(("1>", "2>"))
                    ),
                    len(words),
                )
                found.append(words[:end])
                words = words[end:]
    return found


@cache
def parser_of(command: str):
    """The parser ``spiking-lm COMMAND`` builds (one per command: building LightningCLI's takes seconds)."""
    return capture_parser(lambda: run([command]))


DOCUMENTED = [(path.relative_to(REPO).as_posix(), words) for path in DOCS for words in commands(path.read_text())]


def test_the_docs_hold_commands_of_every_kind():
    assert {words[0] for _, words in DOCUMENTED if words} >= {"fit", "generate", "export", "evaluate", "sweep"}


@pytest.mark.parametrize("doc, words", DOCUMENTED, ids=[f"{doc}: {' '.join(w)[:60]}" for doc, w in DOCUMENTED])
def test_documented_command_parses(doc, words, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the docs give config paths from the repository root
    assert words and (words[0] in COMMANDS or words[0] in ("-h", "--help")), f"{doc}: spiking-lm {words}"
    if words[0] in ("-h", "--help") or "--help" in words:
        return  # help of every command: tests/test_cli.py
    try:
        parser_of(words[0]).parse_args(words if words[0] in LIGHTNING else words[1:])
    except (SystemExit, ArgumentError) as e:
        pytest.fail(f"{doc}: `spiking-lm {shlex.join(words)}` does not parse: {e}\n{capsys.readouterr().err}")


def test_a_wrong_option_fails(monkeypatch):
    monkeypatch.chdir(REPO)
    (words,) = commands("```bash\nspiking-lm fit --config configs/tiny.yaml --trainer.max_stepz 3\n```\n")
    with pytest.raises((SystemExit, ArgumentError)):
        parser_of("fit").parse_args(words)


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_at_files(doc):
    targets = [t for t in LINK.findall(doc.read_text()) if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"


def test_the_site_defaults_table_is_the_codes():
    """docs/model.md lists, per neuron section of ModelConfig, what its default differs from NeuronConfig() in."""
    base, config = NeuronConfig(), ModelConfig()
    rows = {
        m[1]: m[2]
        for m in re.finditer(
            r"^\| [^|]+ \| `(\w+_neuron)` \| ([^|]+) \|$", (REPO / "docs" / "model.md").read_text(), re.M
        )
    }
    sections = [f.name for f in dataclasses.fields(ModelConfig) if isinstance(getattr(config, f.name), NeuronConfig)]
    assert sorted(rows) == sorted(sections)
    for name in sections:
        site = getattr(config, name)
        differs = [
            f"`{f.name}: {getattr(site, f.name)}`"
            for f in dataclasses.fields(NeuronConfig)
            if getattr(site, f.name) != getattr(base, f.name)
        ]
        assert re.findall(r"`[^`]+`", rows[name]) == differs or (not differs and rows[name].strip() == "nothing"), name
