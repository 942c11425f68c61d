"""Every option of every command is checked before any work starts: a bad device name, a choice
outside its list, a non-finite or out-of-range number, a file where a folder is expected (or the
reverse) is one line naming the option, exit 2, and nothing is written.

The options are found by walking the typer app's registered commands and reading each callback's
signature (type and help), so a new command or option is covered without a new test."""

from __future__ import annotations

import inspect
import re
import sys
import typing
from pathlib import Path

import pytest

from moe_lm.cli import app, run

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "configs" / "tiny-moe.yaml"


def _commands(typer_app, prefix=()):
    for info in typer_app.registered_commands:
        yield prefix + (info.name or info.callback.__name__.replace("_", "-"),), info.callback
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance, prefix + (group.name,))


def _params():
    """(command path, name, flag or None for an argument, bare type, help) of every parameter."""
    for path, cb in _commands(app):
        hints = typing.get_type_hints(cb)
        for name, p in inspect.signature(cb).parameters.items():
            tp = hints[name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            bare = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
            decls = getattr(p.default, "param_decls", None)
            flag = decls[0].split("/")[0] if decls else None
            yield path, name, flag, bare, getattr(p.default, "help", "") or ""


PARAMS = list(_params())

# what each command needs besides the option under test, and small sizes in case a check were
# missing (then the test fails quickly instead of starting a long job)
BASE = {
    ("prepare",): ["--max-documents", "2", "--vocab-size", "300"],
    ("train",): ["-c", str(TINY_MOE)],
    ("eval",): ["runs/none"],
    ("compare-dense",): ["-c", str(TINY_MOE)],
    ("info",): ["-c", str(TINY_MOE)],
    ("export",): ["runs/none", "--out", "exported"],
    ("generate",): ["runs/none"],
    ("bench", "layer"): ["--d-model", "8", "--tokens", "8", "--repeats", "1", "--warmup", "0", "--no-hf"],
    ("bench", "train"): ["-c", str(TINY_MOE), "--steps", "1", "--rounds", "1", "--warmup", "0"],
    ("bench", "prepare"): ["--max-bytes", "1000", "--vocab-size", "300"],
}
FILE_PARAMS = {"config", "tokenizer", "text_file"}  # Path parameters that name a file; every other Path is a folder


def test_every_command_has_a_base_and_the_walk_finds_the_options():
    assert {p for p, *_ in PARAMS} == set(BASE)
    flags = {(p, f) for p, _, f, _, _ in PARAMS}
    assert {(("eval",), "--device"), (("bench", "layer"), "--dispatch"), (("generate",), "--temperature"),
            (("train",), "--out")} <= flags


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "adir").mkdir()
    return tmp_path


def call(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["moe-lm", *argv])
    with pytest.raises(SystemExit) as exc:
        run()
    return exc.value.code, capsys.readouterr().err


def assert_refused(workdir: Path, code: int, err: str, *fragments: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], err
    assert sorted(p.name for p in workdir.iterdir()) == ["adir", "afile"], "something was written"
    return lines[0]


def argv_for(path, flag, value) -> list[str]:
    base = list(BASE[path])
    if flag is None:  # the positional argument: it replaces the base's placeholder
        base = [value if b == "runs/none" else b for b in base]
        return [*path, *base]
    return [*path, *base, flag, value]


# --- choices (device names included) ----------------------------------------------------------

CHOICES = [(path, flag, re.search(r"\w[\w-]*(?: \| \w[\w-]*)+", help).group(0).split(" | "))
           for path, _, flag, bare, help in PARAMS if bare is str and re.search(r"\w+ \| \w+", help)]


def test_the_enumerated_options_are_found():
    found = {(p, f) for p, f, _ in CHOICES}
    assert {(("eval",), "--device"), (("generate",), "--device"), (("compare-dense",), "--device"),
            (("bench", "layer"), "--device"), (("bench", "train"), "--device"), (("bench", "layer"), "--dispatch"),
            (("bench", "layer"), "--dtype"), (("eval",), "--split")} <= found


@pytest.mark.parametrize("path, flag, allowed", CHOICES + [(("export",), "--format", ["hf"])],
                         ids=[f"{' '.join(p)} {f}" for p, f, _ in CHOICES] + ["export --format"])
@pytest.mark.parametrize("value", ["tpu", "foo"])
def test_a_value_outside_an_options_choices_is_one_line_listing_them(path, flag, allowed, value, workdir,
                                                                     monkeypatch, capsys):
    code, err = call(argv_for(path, flag, value), monkeypatch, capsys)
    line = assert_refused(workdir, code, err, f"{flag} {value}")
    for a in allowed:
        assert a in line, line


def test_compare_dense_refuses_a_bad_device_before_training_anything(tiny_data_dir, workdir, monkeypatch, capsys):
    code, err = call(["compare-dense", "-c", str(TINY_MOE), f"data.dir={tiny_data_dir}", "train.max_steps=2",
                      "model.d_model=32", "model.n_heads=2", "--device", "tpu"], monkeypatch, capsys)
    assert_refused(workdir, code, err, "--device tpu", "auto | cpu | cuda | mps")


@pytest.mark.parametrize("env, value, choices", [("MOE_LM_CPU_MATMUL", "mkl", "auto, onednn, blas"),
                                                 ("MOE_LM_CPU_KERNEL", "yes", "auto, off")], ids=["matmul", "kernel"])
@pytest.mark.parametrize("argv", [["compare-dense", "-c", str(TINY_MOE), "train.max_steps=2"],
                                  ["train", "-c", str(TINY_MOE), "train.max_steps=2"],
                                  ["bench", "train", "-c", str(TINY_MOE), "--rounds", "1"]], ids=lambda a: a[0])
def test_a_bad_cpu_setting_in_the_environment_is_one_line_before_any_work(argv, env, value, choices, tiny_data_dir,
                                                                          workdir, monkeypatch, capsys):
    monkeypatch.setenv(env, value)
    code, err = call([*argv, f"data.dir={tiny_data_dir}"] if argv[0] != "bench" else argv, monkeypatch, capsys)
    assert_refused(workdir, code, err, f"{env}={value!r}", choices)


# --- numbers ------------------------------------------------------------------------------------

NUMBERS = [(path, flag, bare) for path, _, flag, bare, _ in PARAMS if bare in (int, float)]


def test_the_numeric_options_are_found():
    found = {(p, f) for p, f, _ in NUMBERS}
    assert {(("generate",), "--temperature"), (("generate",), "--top-p"), (("generate",), "--seed"),
            (("compare-dense",), "--seeds"), (("prepare",), "--val-fraction"), (("info",), "--vocab-size")} <= found


CASES = [(p, f, v) for p, f, bare in NUMBERS for v in (["nan", "inf", "-inf"] if bare is float else [str(-2**70)])]


@pytest.mark.parametrize("path, flag, value", CASES, ids=[f"{' '.join(p)} {f} {v}" for p, f, v in CASES])
def test_a_non_finite_or_out_of_range_number_is_one_line_naming_the_option(path, flag, value, workdir,
                                                                          monkeypatch, capsys):
    code, err = call(argv_for(path, flag, value), monkeypatch, capsys)
    assert_refused(workdir, code, err, flag)


@pytest.mark.parametrize("sweep", ["nan", "1e-3,inf", "-1e-3", "1e-3,x", "3e-3,,6e-3", "3e-3,0.003", ",", ""])
def test_lr_sweep_values_are_checked_like_train_lr(sweep, workdir, monkeypatch, capsys):
    code, err = call(["compare-dense", "-c", str(TINY_MOE), "--lr-sweep", sweep], monkeypatch, capsys)
    assert_refused(workdir, code, err, "--lr-sweep")


# --- paths: a file where a folder is expected, a folder where a file is ------------------------

PATHS = [(path, name, flag) for path, name, flag, bare, _ in PARAMS if bare is Path]


def test_the_path_options_are_found():
    assert {(("train",), "--out"), (("eval",), None), (("eval",), "--data"), (("prepare",), "--tokenizer"),
            (("compare-dense",), "--reuse-moe"), (("export",), "--out")} <= {(p, f) for p, _, f in PATHS}


WRONG_KIND = [(p, f, "adir" if n in FILE_PARAMS else bad, "is a folder, not a" if n in FILE_PARAMS else "afile")
              for p, n, f in PATHS for bad in (["afile", "afile/sub"] if n not in FILE_PARAMS else ["x"])]


@pytest.mark.parametrize("path, flag, value, fragment", WRONG_KIND,
                         ids=[f"{' '.join(p)} {f or 'PATH'} {v}" for p, f, v, _ in WRONG_KIND])
def test_a_path_of_the_wrong_kind_is_one_line(path, flag, value, fragment, workdir, monkeypatch, capsys):
    code, err = call(argv_for(path, flag, value), monkeypatch, capsys)
    line = assert_refused(workdir, code, err, fragment)
    assert "is a file, not a" in line or "is a folder, not a" in line, line


def test_train_out_file_with_resume_auto_is_one_line(workdir, monkeypatch, capsys):
    # the case: --out names a regular file and --resume auto looked inside it
    code, err = call(["train", "-c", str(TINY_MOE), "--out", "afile", "--resume", "auto"], monkeypatch, capsys)
    assert_refused(workdir, code, err, "--out afile is a file, not a folder")
    code, err = call(["train", "-c", str(TINY_MOE), "--resume", "afile"], monkeypatch, capsys)
    assert_refused(workdir, code, err, "--resume afile is a file, not a folder")
