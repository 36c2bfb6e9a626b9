"""Every command line quoted in README.md and docs/*.md works as written: the CLI accepts its arguments,
its config files exist and load with its overrides, the light commands run on the real catalog, and the
benchmark scripts exist with the flags quoted (issue: docs gave `templates check --templates FILE`, which
the CLI rejected).

Commands are taken from fenced code blocks (a quoted argument may go on over lines) and from inline code
spans; a command is `instructkit ...`, or `python|torchrun|accelerate launch ... -m instructkit ...`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.cli import build_parser, main
from instructkit.config_load import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WRAPPERS = {"/usr/bin/time", "time", "-v"}


def quoted_commands(text: str) -> list[str]:
    """Command lines in fenced blocks (joined while a quote is open) and in inline code spans."""
    commands = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        buffer = ""
        for line in block.splitlines():
            buffer = f"{buffer}\n{line}" if buffer else line
            try:
                shlex.split(buffer, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            commands.append(buffer)
            buffer = ""
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(span.split()) for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", outside)]
    return commands


def command_parts(command: str) -> list[list[str]]:
    """The `&&`-separated parts of a shell command line, as tokens (comments dropped)."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        return []
    parts, part = [], []
    for token in tokens:
        if token == "&&":
            parts.append(part)
            part = []
        else:
            part.append(token)
    return [p for p in parts + [part] if p]


def instructkit_argv(part: list[str]) -> list[str] | None:
    """The arguments after `instructkit` or `-m instructkit`, or None when the part runs something else."""
    tokens = list(part)
    while tokens and tokens[0] in WRAPPERS:
        tokens.pop(0)
    if tokens and tokens[0] == "instructkit":
        return tokens[1:]
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1] == "instructkit":
            return tokens[i + 2:]
    return None


def _collect() -> tuple[list[tuple[str, list[str], list[str]]], list[tuple[str, list[str]]]]:
    cli, scripts = [], []
    for doc in DOCS:
        for command in quoted_commands(doc.read_text(encoding="utf-8")):
            for part in command_parts(command):
                argv = instructkit_argv(part)
                where = f"{doc.name}: {' '.join(part)[:90]}"
                if argv is not None:
                    cli.append((where, argv, part))
                elif len(part) > 1 and part[0] in ("python", "python3") and part[1].startswith("benchmarks/"):
                    scripts.append((where, part[1:]))
    return cli, scripts


CLI, SCRIPTS = _collect()


def test_the_docs_quote_the_commands():
    """The extraction finds the README's tour, the scaling-out launchers and the docs' inline commands."""
    quoted = {" ".join(argv) for _, argv, _ in CLI}
    for expected in ("run", "templates list --dataset amazon_us_reviews", "templates check",
                     "train examples/amazon_reviews.yaml", "templates check templates.yaml --data rows.jsonl",
                     "estimate-memory examples/amazon_reviews.yaml --budget 4GB"):
        assert expected in quoted, expected
    assert any(argv[:1] == ["generate"] and argv[-1].endswith("Rating:") for _, argv, _ in CLI)  # two lines
    assert any(part[0] == "torchrun" for _, _, part in CLI) and SCRIPTS


@pytest.mark.parametrize("where, argv, part", CLI, ids=[c[0] for c in CLI])
def test_the_cli_accepts_every_quoted_command(where, argv, part):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        # A bare name in prose ("also: `instructkit export`") names the command: it must answer --help.
        if not (argv and all(re.fullmatch(r"[a-z-]+", a) for a in argv) and len(argv) <= 2):
            pytest.fail(f"{where}: the CLI rejects `instructkit {' '.join(argv)}` (exit {exc.code})")
        with pytest.raises(SystemExit) as helped:
            parser.parse_args([*argv, "--help"])
        assert helped.value.code == 0, where
    if "--config_file" in part:  # accelerate launch --config_file FILE
        assert (ROOT / part[part.index("--config_file") + 1]).is_file(), where


def _config_command(argv: list[str]) -> tuple[Path, list[str]] | None:
    if not argv or argv[0] not in ("run", "prepare", "train", "estimate-memory"):
        return None
    values = [a for a in argv[1:] if not a.startswith("--") and a != "4GB"]
    if not values or "=" in values[0]:
        return None
    path = ROOT / values[0]
    return (path, [v for v in values[1:] if "=" in v]) if path.is_file() else None


CONFIGS = [(where, *found) for where, argv, _ in CLI if (found := _config_command(argv))]


@pytest.mark.parametrize("where, path, overrides", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_quoted_config_loads_with_its_overrides(where, path, overrides):
    config = load_config(path, overrides)
    assert config.datasets, where


SUBCOMMANDS = sorted({tuple(argv[:2]) if argv[:1] == ["templates"] else tuple(argv[:1]) for _, argv, _ in CLI
                      if argv and not argv[0].startswith("-")})


@pytest.mark.parametrize("subcommand", SUBCOMMANDS, ids=[" ".join(s) for s in SUBCOMMANDS])
def test_every_quoted_subcommand_answers_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*subcommand, "--help"])
    assert exc.value.code == 0
    assert "usage: instructkit" in capsys.readouterr().out


LIGHT = [(where, argv) for where, argv, _ in CLI if argv[:1] == ["templates"]
         and not any(a in ("ID", "FILE", "templates.yaml", "...") for a in argv)]


@pytest.mark.parametrize("where, argv", LIGHT, ids=[c[0] for c in LIGHT])
def test_quoted_template_commands_run(where, argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = [argv[i + 1] for i, a in enumerate(argv) if a == "--data"]
    if data and not (ROOT / data[0]).exists():
        pytest.skip(f"{data[0]} not found (the shared data folder is absent)")
    assert main(argv) == 0, where
    out = capsys.readouterr().out
    if "--format" in argv and "json" in argv:
        assert isinstance(json.loads(out), list)


def test_quoted_prepare_runs_on_the_real_data(tmp_path, monkeypatch, capsys):
    quoted = [argv for _, argv, _ in CLI if argv[:1] == ["prepare"] and len(argv) > 1 and (ROOT / argv[1]).is_file()]
    assert quoted
    monkeypatch.chdir(ROOT)
    for argv in quoted:
        config = load_config(ROOT / argv[1])
        paths = [d.path for d in config.datasets if d.path and d.path != "demo"]
        if not all(Path(p).exists() for p in paths):
            pytest.skip(f"{paths} not found (the shared data folder is absent)")
        assert main([*argv, f"output_dir={tmp_path}"]) == 0  # the same command, its run folder in tmp
        assert (tmp_path / config.name / "train.jsonl").is_file()


@pytest.mark.parametrize("where, argv", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_quoted_benchmark_scripts_exist_with_their_flags(where, argv):
    script = ROOT / argv[0]
    assert script.is_file(), where
    flags = [a for a in argv[1:] if a.startswith("--")]
    if flags:
        done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        missing = [f for f in flags if f not in done.stdout]
        assert not missing, f"{where}: {script.name} --help lacks {missing}"
