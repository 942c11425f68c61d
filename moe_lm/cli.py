"""The `moe-lm` command line. Thin: parse, call the library, render with rich. No logic here.

Errors a user can fix (`MoeLmError`) print as one line and exit 2; `--debug` shows the traceback.
Anything else is a crash: one line plus a pointer to `--debug`, exit 1.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__, checks, signals
from .data.prepare import PrepareOptions
from .errors import MoeLmError

app = typer.Typer(
    name="moe-lm",
    help="Train small Mixture-of-Experts language models (Shazeer et al. 2017) on a laptop or one GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

OVERRIDES_HELP = "Config overrides after the options, as dotted key=value (e.g. train.lr=1e-3 model.moe.top_k=1)."


def options_of(cls: type):
    """Give a command one option per field of dataclass `cls` that has a help text: `--field-name`,
    with the field's type, default and help (declared once, in the library: prepare's options are
    data.prepare.PrepareOptions). The command takes them as **options, ready for cls(**options);
    its own parameters follow."""
    def add(command):
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
        added = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                                   default=typer.Option(f.default, "--" + f.name.replace("_", "-"),
                                                        help=escape(f.metadata["help"]),
                                                        show_default=f.metadata.get("show_default", True)))
                 for f in fields]
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = signature.replace(parameters=added + own)
        command.__annotations__ = {**{p.name: p.annotation for p in added + own},
                                   "return": signature.return_annotation}
        return command
    return add


def _version(value: bool) -> None:
    if value:
        console.print(f"moe-lm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """moe-lm: prepare a corpus, train an MoE Transformer, evaluate it, compare it with its dense twin.

    Quick start (offline, built-in corpus = the Python standard library's source):

      moe-lm prepare
      moe-lm train --config configs/tiny-moe.yaml
      moe-lm eval runs/tiny-moe
      moe-lm compare-dense --config configs/tiny-moe.yaml --seeds 3
    """
    _state["debug"] = debug
    checks.refuse_torchrun(ctx.invoked_subcommand)
    # NOTE: SIGTERM (kill, docker stop, schedulers, torchrun) stops every command as Ctrl-C does:
    # cleanups run, the trainer saves, the exit status is 128 + the signal (130 / 143)
    ctx.call_on_close(signals.raise_on_stop_signals())


# ---------------------------------------------------------------------------------------------
# prepare


@app.command()
@options_of(PrepareOptions)
def prepare(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Prepare the data this config trains on: its data.dir and data.vocab_size, else model.vocab_size (e.g. configs/tiny-moe.yaml)."),
    **options,
) -> None:
    """Read a corpus, train a byte-level BPE tokenizer, write token shards to data/<name>/.

    With no source option it prepares the built-in corpus (the Python standard library's source
    of this interpreter; no network needed) into data/builtin/. With --config it writes the
    folder and vocabulary that config asks for (the demo: `moe-lm prepare -c configs/tiny-moe.yaml`).
    """
    from .data.prepare import for_config, prepare_corpus, render_summary

    opts = PrepareOptions(**options)
    if config is not None:
        from .config import load_config

        opts = for_config(opts, load_config(config))
    try:
        summary = prepare_corpus(opts, console=console)
    except KeyboardInterrupt as exc:
        # NOTE: prepare removed its temporary folder. SystemExit, because typer turns a
        # KeyboardInterrupt into a returned 130 that run() would drop (exit 0).
        err_console.print(f"interrupted ({signals.name(signals.signum_of(exc))}): nothing was written")
        raise SystemExit(signals.exit_status(exc)) from None
    render_summary(summary, console=console)


# ---------------------------------------------------------------------------------------------
# train


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    config: Path = typer.Option(..., "--config", "-c", help="A YAML config (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<name>/)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (this run's latest checkpoint, if any) or a checkpoint folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run folder and start again."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train the model of a config, logging loss, perplexity and per-expert load.

    Several processes: torchrun --nproc_per_node=N -m moe_lm train --config X.yaml (data parallel;
    add model.moe.expert_parallel=true to spread the experts over the processes). See docs/DISTRIBUTED.md.
    """
    from .config import dump_yaml, load_config

    cfg = load_config(config, overrides or [])
    if print_config:
        console.print(dump_yaml(cfg), end="", markup=False, highlight=False)
        return
    from .training.trainer import TrainingInterrupted, train as run_training

    try:
        run_training(cfg, out_dir=out, resume=resume, overwrite=overwrite, console=console,
                     command_line=sys.argv)
    except KeyboardInterrupt as exc:
        # NOTE: the trainer saved a checkpoint and said how to resume. SystemExit, because typer
        # turns a KeyboardInterrupt into a *returned* 130 that run() would drop (exit 0).
        if not isinstance(exc, TrainingInterrupted):  # before the first step: nothing to save
            err_console.print(f"interrupted ({signals.name(signals.signum_of(exc))}) before training started")
        raise SystemExit(signals.exit_status(exc)) from None


# ---------------------------------------------------------------------------------------------
# eval


@app.command("eval")
def eval_cmd(
    path: Path = typer.Argument(..., help="A run folder (its latest checkpoint) or a checkpoint folder.", show_default=False),
    split: str = typer.Option("val", "--split", help="Split to evaluate: val | test | train."),
    batches: Optional[int] = typer.Option(None, "--batches", help="A fixed seeded sample of N batches \\[default: the run's own evaluation sample, train.eval_batches].", show_default=False),
    all_tokens: bool = typer.Option(False, "--all", help="Every token of the split once (non-overlapping windows)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder \\[default: the run's data.dir]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where eval.json and plots/ go \\[default: the run folder]."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    json_out: bool = typer.Option(False, "--json", help="Print eval.json instead of the tables."),
    html: Optional[str] = typer.Option(None, "--html", metavar="[PATH.html]", help="Also write the routing page: each token of a few passages coloured by its experts, one self-contained HTML file (default: routing.html beside eval.json; a path given must end in .html, or use --html=PATH).", show_default=False),
    text_file: Optional[Path] = typer.Option(None, "--text", help="Show this UTF-8 text file's tokens (eval.json passages, --html page) instead of validation passages.", show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Show this text's tokens instead of validation passages.", show_default=False),
) -> None:
    """Perplexity, the routing report (load, importance, CV, dropped, entropy, dead experts) and
    expert specialisation; writes eval.json and a layer x expert heatmap beside the run; with
    --html, a page showing which experts each token of a few passages went to."""
    import json

    from .evaluation import check_options, read_user_text, render_report, run_eval

    n_batches = check_options(split=split, batches=batches, all_tokens=all_tokens, device=device, data_dir=data,
                              out_dir=out)
    text = read_user_text(text_file, prompt)
    page = None if html is None else (True if html == HTML_DEFAULT else Path(html))
    report, files = run_eval(path, split=split, n_batches=n_batches, data_dir=data, out_dir=out, device=device,
                             console=None if json_out else console, text=text, html=page)
    if json_out:
        console.print(json.dumps(report.to_json(), indent=1, ensure_ascii=False), markup=False, highlight=False,
                      soft_wrap=True)
    else:
        render_report(report, console, files)


# ---------------------------------------------------------------------------------------------
# compare-dense


@app.command("compare-dense", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def compare_dense_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="An MoE config (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per model (train.seed, +1, ...); the spread decides the verdict (a win needs at least 3)."),
    with_dense_total: bool = typer.Option(False, "--with-dense-total", help="Also train a dense model with as many total parameters as the MoE (an upper reference)."),
    lr_sweep: Optional[str] = typer.Option(None, "--lr-sweep", help="Comma-separated learning rates, e.g. 1e-3,3e-3,6e-3: each model keeps its own best (seed train.seed) for all seeds.", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder \\[default: runs/compare-<name>/]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain runs that exist instead of reusing or resuming them."),
    reuse_moe: Optional[Path] = typer.Option(None, "--reuse-moe", help="A finished `moe-lm train` run of this config (e.g. runs/tiny-moe): copied in as the MoE's first seed instead of training it again.", show_default=False),
    device: str = typer.Option("auto", "--device", help="Device for the final evaluations: auto | cpu | cuda | mps (training follows train.device)."),
) -> None:
    """Train the MoE and its dense twin (equal FLOPs per token) over several seeds with the same
    data order and schedule, then report perplexity vs training FLOPs and wall-clock, with a verdict.

    Finished runs are reused and interrupted ones resumed, so it can be stopped and run again."""
    from .compare import compare_dense, render_table
    from .config import load_config

    cfg = load_config(config, overrides or [])
    try:  # NOTE: compare_dense checks every option before it trains anything
        report = compare_dense(cfg, seeds=seeds, with_dense_total=with_dense_total, out_dir=out, lr_sweep=lr_sweep,
                               overwrite=overwrite, device=device, console=console, reuse_moe=reuse_moe)
    except KeyboardInterrupt as exc:
        err_console.print(f"interrupted ({signals.name(signals.signum_of(exc))}): finished runs are kept; "
                          "run the same command again to continue")
        raise SystemExit(signals.exit_status(exc)) from None
    render_table(report, console)


# ---------------------------------------------------------------------------------------------
# info


@app.command()
def info(
    config: Path = typer.Option(..., "--config", "-c", help="A YAML config (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Vocabulary size \\[default: model.vocab_size, else the data folder's, else data.vocab_size, else 8192 (prepare's default); the output says which]."),
) -> None:
    """Total vs active parameters, FLOPs per token, the dense twin, and a training-memory estimate."""
    from .config import load_config
    from .model.accounting import render_info

    checks.option_number("--vocab-size", vocab_size, 2, 2**32, integer=True)
    cfg = load_config(config, overrides or [])
    render_info(cfg, vocab_size=vocab_size, console=console)


# ---------------------------------------------------------------------------------------------
# bench

bench_app = typer.Typer(help="Benchmarks: the MoE layer against dense and transformers (more: see benchmarks/).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("layer")
def bench_layer_cmd(
    d_model: int = typer.Option(512, "--d-model", help="Hidden size."),
    tokens: int = typer.Option(8192, "--tokens", help="Tokens per forward (batch x sequence)."),
    experts: int = typer.Option(8, "--experts", help="Routed experts."),
    top_k: int = typer.Option(2, "--top-k", help="Experts per token."),
    ffn_hidden: Optional[int] = typer.Option(None, "--ffn-hidden", help="Width of each expert (default 4·d_model/top_k; the dense FFN is top_k times wider)."),
    repeats: int = typer.Option(10, "--repeats", help="Timed rounds (the median counts)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed rounds first."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    dispatch: Optional[str] = typer.Option(None, "--dispatch", help="Force a dispatch path: fused | padded | grouped_mm where this torch has it (default: the measured rule)."),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Also time transformers' MixtralSparseMoeBlock when installed."),
    tune_malloc: bool = typer.Option(False, "--tune-malloc", help="glibc: keep freed memory in the heap (no page faults on large allocations), for every contender."),
    busy: int = typer.Option(0, "--busy", help="Run this many busy-loop processes beside the measurement (a machine that is not quiet)."),
    also: Optional[List[str]] = typer.Option(None, "--also", help="Also time the MoE layer forced onto this dispatch path (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Forward+backward time of one MoE layer vs the dense FFN of equal active width and vs transformers' Mixtral block."""
    import json

    from . import bench

    if tune_malloc:
        bench.tune_malloc()
    r = bench.bench_layer(d_model=d_model, tokens=tokens, experts=experts, top_k=top_k, ffn_hidden=ffn_hidden,
                          repeats=repeats, warmup=warmup, threads=threads, device=device, dtype=dtype,
                          dispatch_path=dispatch, hf=hf, busy=busy, also_paths=tuple(also or ()))
    r["tune_malloc"] = tune_malloc
    if json_out:
        console.print(json.dumps(r, indent=2), markup=False, highlight=False, soft_wrap=True)
    else:
        bench.render_layer(r, console)


# ---------------------------------------------------------------------------------------------
# export, generate


@app.command()
def export(
    path: Path = typer.Argument(..., help="A run folder (its latest checkpoint) or a checkpoint folder.", show_default=False),
    fmt: str = typer.Option("hf", "--format", help="hf: a folder that transformers loads (Llama / Mixtral / Qwen2-MoE)."),
    out: Path = typer.Option(..., "--out", help="Output folder.", show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty output folder."),
) -> None:
    """Write a folder that transformers' AutoModelForCausalLM / AutoTokenizer load offline.

    Only exact matches export: a model no transformers architecture computes exactly (relu/gelu
    FFNs, expert_choice, sigmoid_bias, capacity limits) is refused, never approximated.
    """
    from .errors import ExportError
    from .export import export_hf

    if fmt != "hf":
        raise ExportError(f"--format {fmt} is not supported", "use --format hf")
    r = export_hf(path, out, overwrite=overwrite)
    console.print(f"exported {r.checkpoint} (step {r.step}, {r.n_params:,} parameters) as {r.architecture} "
                  f"to {r.out_dir}: {', '.join(r.files)}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def generate(
    path: Path = typer.Argument(..., help="A run folder, a checkpoint folder or an exported folder.", show_default=False),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue (empty: start a new document)."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", help="Tokens to generate at most (stops earlier at end-of-text)."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy; higher = more random."),
    top_k: Optional[int] = typer.Option(50, "--top-k", help="Sample among the K most likely tokens (0 = all)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample among the most likely tokens whose probability reaches P."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same text."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence at each token (slow; for comparison)."),
) -> None:
    """Sample text from a trained model, streamed as it is generated (KV cache)."""
    from .device import resolve_device
    from .generate import check_options, stream
    from .loading import load_model

    top_k = check_options(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    dev, _ = resolve_device(device, "float32", "--device")
    loaded = load_model(path, device=dev)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    write(prompt)
    stats = stream(loaded, prompt, write, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, use_cache=not no_cache)
    write("\n")
    end = "end-of-text" if stats.stopped_at_eot else "max tokens"
    err_console.print(f"[dim]{stats.new_tokens} tokens in {stats.seconds:.2f} s ({stats.tokens_per_s:.1f} tokens/s, "
                      f"{'no ' if no_cache else ''}KV cache, stopped at {end})[/]", highlight=False)


@bench_app.command("train")
def bench_train_cmd(
    config: Path = typer.Option(Path("configs/tiny-moe.yaml"), "--config", "-c", help="A config: an MoE one is timed against its dense twin, a dense one alone."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    steps: int = typer.Option(5, "--steps", help="Optimizer steps per timed round."),
    rounds: int = typer.Option(5, "--rounds", help="Timed rounds per model, alternating (the median counts)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps per model first."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | mps \\[default: the config's train.device]."),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Training tokens/s of a config's model and of its dense twin, alternating in one process;
    their ratio, model FLOP utilisation against the measured matmul peak, and peak memory. A
    dense config is timed alone."""
    import json

    from .bench import bench_train, render_train
    from .config import load_config

    cfg = load_config(config, overrides or [])
    r = bench_train(cfg, steps=steps, rounds=rounds, warmup=warmup, device=device)  # checks its options first
    if json_out:
        console.print(json.dumps(r, indent=2), markup=False, highlight=False, soft_wrap=True)
    else:
        render_train(r, console)


@bench_app.command("prepare")
def bench_prepare_cmd(
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help="Cap the corpus \\[default: all of it]."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="BPE vocabulary to train."),
    repeats: int = typer.Option(1, "--repeats", help="Runs (the median counts)."),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Tokeniser training time and tokenisation MB/s of `prepare` on the built-in corpus (in a temporary folder)."""
    import json

    from .bench import prepare_throughput, render_prepare

    r = prepare_throughput(max_bytes=max_bytes, vocab_size=vocab_size, repeats=repeats)
    if json_out:
        console.print(json.dumps(r, indent=2), markup=False, highlight=False, soft_wrap=True)
    else:
        render_prepare(r, console)


HTML_DEFAULT = "\0default"  # `--html` given without a path


def optional_html_value(args: list[str]) -> list[str]:
    """`eval --html [PATH.html]`: the option's value may be left out (typer options always take
    one), so a bare `--html` becomes `--html=<default>` unless the next argument names an
    .html/.htm file. `--html=PATH` always takes PATH."""
    out = []
    for i, a in enumerate(args):
        if a == "--html":
            nxt = args[i + 1] if i + 1 < len(args) else ""
            if not nxt.lower().endswith((".html", ".htm")):
                a = f"--html={HTML_DEFAULT}"
        out.append(a)
    return out


def _click_exceptions() -> tuple[type, type, type]:
    """(ClickException, Exit, Abort) as the running typer raises them: click's own, or those of the
    copy of click that typer ≥ 0.2x vendors (not click's, so `isinstance(exc, click.X)` misses
    them). Found through typer's public names: typer.BadParameter is a ClickException either way."""
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return click_error, typer.Exit, typer.Abort


def run() -> None:
    """Console-script entry point: run the app, turning user errors into one line + exit 2.

    A usage error (unknown command or option, a missing argument) prints as click prints it: the
    command's usage line, the problem with click's own "Did you mean", exit 2."""
    click_error, click_exit, click_abort = _click_exceptions()
    try:
        code = app(args=optional_html_value(sys.argv[1:]), standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            # NOTE: without standalone mode click *returns* the exit code of a Ctrl-C it caught:
            # 130, for SIGTERM too (the signals module knows which signal it was)
            sys.exit(signals.exit_status() if code == 130 else code)
    except MoeLmError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        err_console.print("interrupted")
        sys.exit(signals.exit_status(exc))
    except SystemExit:
        raise
    except click_error as exc:  # usage errors: standalone mode is off, so they come here to be shown
        exc.show()
        sys.exit(exc.exit_code)
    except click_exit as exc:
        sys.exit(exc.exit_code)
    except click_abort:
        err_console.print("aborted")
        sys.exit(signals.exit_status())
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]unexpected error:[/] {type(exc).__name__}: {escape(str(exc))} (this is a bug; rerun with --debug for the traceback)",
            highlight=False, soft_wrap=True,
        )
        sys.exit(1)
