"""Usage errors (a mistyped command or option, a missing argument) come out as click prints them:
the command's usage line, the problem with click's own "Did you mean", exit status 2 - on every
command the app registers, found by walking the app (a new command is covered without a new test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from moe_lm.cli import app, run

ROOT = Path(__file__).resolve().parents[1]


def _commands(cmd, path=()):
    """(path, click command) of every leaf command, and (path, group) of every group."""
    subs = getattr(cmd, "commands", None)
    if subs:
        yield path, cmd, True
        for name, sub in subs.items():
            yield from _commands(sub, path + (name,))
    else:
        yield path, cmd, False


ALL = list(_commands(typer.main.get_command(app)))
LEAVES = [(p, c) for p, c, group in ALL if not group]
GROUPS = [(p, c) for p, c, group in ALL if group]
MISSING = [(p, c, param) for p, c in LEAVES for param in c.params if param.required]


def test_the_walk_finds_every_command():
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"prepare", "train", "eval", "compare-dense", "info", "export", "generate", "bench layer",
            "bench train", "bench prepare"} <= names
    assert {"train", "eval", "compare-dense", "info", "export", "generate"} <= {" ".join(p) for p, _, _ in MISSING}


def call(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["moe-lm", *argv])
    with pytest.raises(SystemExit) as exc:
        run()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_usage_error(code: int, err: str, command: tuple[str, ...], *fragments: str) -> None:
    assert code == 2, err
    assert "unexpected error" not in err and "this is a bug" not in err and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("Usage: ") and " ".join(command) in lines[0], err  # the command's usage line
    assert lines[-1].startswith("Error: "), err
    for f in fragments:
        assert f in lines[-1], err


@pytest.mark.parametrize("path, cmd", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_an_unknown_option_is_a_usage_error(path, cmd, monkeypatch, capsys):
    code, _, err = call([*path, "--no-such-option", "1"], monkeypatch, capsys)
    assert_usage_error(code, err, path, "No such option: --no-such-option")


@pytest.mark.parametrize("path, group", GROUPS, ids=[" ".join(p) or "moe-lm" for p, _ in GROUPS])
def test_an_unknown_command_is_a_usage_error_with_did_you_mean(path, group, monkeypatch, capsys):
    real = sorted(group.commands)[0]
    typo = real[0] + real[2] + real[1] + real[3:]  # two letters swapped, as a person types it
    code, _, err = call([*path, typo], monkeypatch, capsys)
    assert_usage_error(code, err, path, f"No such command '{typo}'", f"Did you mean '{real}'?")


@pytest.mark.parametrize("path, cmd, param", MISSING, ids=[f"{' '.join(p)} {q.name}" for p, _, q in MISSING])
def test_a_missing_required_option_or_argument_is_a_usage_error(path, cmd, param, monkeypatch, capsys):
    argv = list(path)
    for other in cmd.params:
        if other.required and other is not param and other.param_type_name == "option":
            argv += [other.opts[0], "x"]
    argv += ["x" for other in cmd.params if other.required and other is not param and other.param_type_name == "argument"]
    code, _, err = call(argv, monkeypatch, capsys)
    what = f"Missing option '{param.opts[0]}'" if param.param_type_name == "option" else "Missing argument"
    assert_usage_error(code, err, path, what)


def test_the_issues_three_typos_from_a_real_shell():
    for argv, fragment in ((["eval", "runs/x", "--htm", "x"], "No such option: --htm"),
                           (["train", "-c", "configs/tiny-moe.yaml", "--lr", "3"], "No such option: --lr"),
                           (["trian"], "No such command 'trian'. Did you mean 'train'?")):
        proc = subprocess.run([sys.executable, "-m", "moe_lm", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Usage: " in proc.stderr and fragment in proc.stderr and "this is a bug" not in proc.stderr


@pytest.mark.parametrize("path, cmd", LEAVES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_options_help_is_shown_whole(path, cmd):
    # rich markup took "[default: the run's data.dir]" for a style tag and dropped it: the help read
    # "Data folder ." - every bracketed part of every option's help must reach the screen
    import re

    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    for param in cmd.params:
        for part in re.findall(r"\[[^\]]*\]", getattr(param, "help", None) or ""):
            assert " ".join(part.replace("\\[", "[").split()) in shown, (param.name, part)
