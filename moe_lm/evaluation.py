"""`moe-lm eval`'s library side: perplexity, the routing report and expert specialisation.

    report = evaluate_model(model, tokens, seq_len=128, batch_size=16, n_batches=None)   # all windows
    report.ppl, report.n_tokens, report.layers[0].load_share, ...
    result = run_eval("runs/tiny-moe", split="val")      # load + evaluate + eval.json + heatmap

Perplexity is exp(mean token cross-entropy), every target token counted once: with
`n_batches=None` the split is covered by non-overlapping windows; otherwise a fixed seeded sample
(by default the same windows the trainer's evaluations use, so `eval` reproduces the run's last
validation loss).

The routing report per MoE layer follows Shazeer et al. 2017 (Table 6): each expert's share of
the routed assignments (Load) and of the gate weight (Importance), their coefficients of variation
and the max/mean load; plus the share of assignments dropped by a capacity limit, the mean router
entropy, and the experts that received nothing (dead) or under a quarter of their fair share.
Specialisation: per expert, the tokens it receives most often and those it receives most
selectively, and per domain (the built-in corpus tags each file with its top-level module) the
share of the domain's assignments each expert takes.

Passages: a few whole evaluation windows (a seeded choice among the windows of the pass, cut to
PASSAGE_TOKENS tokens) are recorded token by token during the same forward passes that give the
statistics: each token's kept experts and gate weights per MoE layer, and the experts a capacity
limit dropped. `route_text` records the user's own text the same way. They go to eval.json
("passages") and to the routing page (`moe_lm.routing_page`).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device
from .errors import DataError
from .files import sha256_file, write_atomic
from .stats import STARVED, perplexity

TOP_TOKENS = 8  # tokens listed per expert
MIN_COUNT_SELECTIVE = 20  # a token must occur this often to be listed as selective
N_PASSAGES = 3  # evaluation windows recorded token by token (eval.json "passages", the routing page)
PASSAGE_TOKENS = 128  # at most this many tokens of each recorded window
MAX_TEXT_TOKENS = 1024  # the user's own text (--text / --prompt) is cut after this many tokens
WEIGHT_DIGITS = 4  # gate weights in eval.json are rounded to this many decimals


@dataclass
class LayerReport:
    """Routing of one MoE layer over the evaluated tokens."""

    layer: int
    load: list[int]  # kept assignments per expert
    load_share: list[float]  # load / total (sums to 1)
    importance_share: list[float]  # gate weight per expert / total gate weight (sums to 1)
    cv_load: float  # std / mean of load (Shazeer Table 6: CV(Load))
    cv_importance: float  # CV(Importance)
    max_mean: float  # max / mean load
    dropped_pct: float  # % of assignments dropped by a capacity limit (expert choice: % of tokens not taken)
    entropy: float  # mean router entropy, nats (log E = uniform)
    dead: list[int]  # experts that received no token
    starved: list[int]  # experts under STARVED x the uniform share
    top_tokens: list[list[tuple[str, int]]] = field(default_factory=list)  # per expert: (token, count), most often
    selective_tokens: list[list[tuple[str, float]]] = field(default_factory=list)  # per expert: (token, share of its occurrences routed here)
    domain_share: dict[str, list[float]] = field(default_factory=dict)  # domain -> share of its assignments per expert
    domain_assignments: dict[str, int] = field(default_factory=dict)  # domain -> its assignments in this layer


@dataclass
class PassageLayer:
    """How one MoE layer routed each token of a passage (lists aligned with Passage.ids).

    experts[i]: the experts that processed token i (kept assignments), by gate weight descending;
    empty when none did (expert choice: no expert picked it; token choice: all its choices were
    dropped). weights[i]: their gate weights. top1[i]: experts[i][0], or None. dropped[i]: experts
    the router chose for token i whose assignment a capacity limit dropped.
    """

    layer: int
    top1: list[Optional[int]]
    experts: list[list[int]]
    weights: list[list[float]]
    dropped: list[list[int]]


@dataclass
class Passage:
    """One routed token sequence: an evaluation window (cut to PASSAGE_TOKENS) or the user's text.

    ids: token ids; text_tokens: the text each token adds (whole UTF-8 characters, see
    data.tokenizer.token_texts; "" for a token that only starts a character); domains: the
    domains the tokens come from, in order of appearance (empty without domain tags); layers: one
    PassageLayer per MoE layer, in layer order.
    """

    source: str  # "window 7 of the pass (batch 0, row 7)" (of the report's split) or "text"
    ids: list[int]
    text_tokens: list[str]
    domains: list[str]
    layers: list[PassageLayer]


@dataclass
class EvalReport:
    split: str
    loss: float  # mean token cross-entropy, nats
    ppl: float
    n_tokens: int  # target tokens the figures rest on
    windows: str  # "all" (non-overlapping cover) or "sample of N batches x B (seed S)"
    layers: list[LayerReport]
    seconds: float = 0.0
    checkpoint: Optional[str] = None
    step: Optional[int] = None
    data_dir: Optional[str] = None
    data_fingerprint: Optional[str] = None  # sha256 of the data folder's meta.json (its files' checksums)
    name: Optional[str] = None  # the run's config name
    moe: Optional[dict] = None  # router, n_experts, top_k, n_shared_experts, capacity_factor; None = dense
    passages: list[Passage] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _cv(v: np.ndarray) -> float:
    m = v.mean()
    return float(v.std() / m) if m > 0 else 0.0


class _LayerAccumulator:
    """Sums one MoE layer's statistics over the evaluation batches (on the device)."""

    def __init__(self, layer: int, n_experts: int, vocab: int, n_domains: int, device):
        self.layer, self.E, self.V, self.D = layer, n_experts, vocab, n_domains
        self.load = torch.zeros(n_experts, dtype=torch.float64, device=device)
        self.importance = torch.zeros(n_experts, dtype=torch.float64, device=device)
        self.token_expert = torch.zeros(n_experts * vocab, dtype=torch.float64, device=device)
        self.token_count = torch.zeros(vocab, dtype=torch.float64, device=device)
        self.domain_expert = torch.zeros(max(n_domains, 1) * n_experts, dtype=torch.float64, device=device)
        self.dropped = 0.0
        self.entropy = 0.0
        self.weight = 0

    def add(self, stats, assignments, x: torch.Tensor, dom: Optional[torch.Tensor]) -> None:
        n = x.numel()
        self.load += stats.load.double()
        self.importance += stats.importance.double()
        self.dropped += float(stats.dropped_frac) * n
        self.entropy += float(stats.entropy) * n
        self.weight += n
        token, expert = assignments
        self.token_count += torch.bincount(x.reshape(-1), minlength=self.V).double()
        ids = x.reshape(-1)[token]
        self.token_expert += torch.bincount(expert * self.V + ids, minlength=self.E * self.V).double()
        if dom is not None:
            d = dom.reshape(-1)[token]
            self.domain_expert += torch.bincount(d * self.E + expert, minlength=self.D * self.E).double()


def evaluate_model(model, tokens: np.ndarray, *, seq_len: int, batch_size: int, n_batches: Optional[int] = None,
                   micro_batch: Optional[int] = None, seed: int = 0, domains: Optional[np.ndarray] = None,
                   domain_names: Optional[list[str]] = None,
                   decode=None, device: torch.device | str = "cpu", amp_dtype=None,
                   progress: Any = None, passages: int = 0, passage_tokens: int = PASSAGE_TOKENS,
                   pieces: Optional[Callable[[list[int]], list[str]]] = None) -> EvalReport:
    """Cross-entropy and routing statistics of `model` over windows of `tokens`.

    n_batches None: every token of the split once (non-overlapping windows); else a fixed seeded
    sample of n_batches x batch_size windows. micro_batch: rows per forward (default batch_size),
    so the windows do not depend on it (the trainer's micro-batch: batch_size // grad_accum).
    domains: per-token domain ids aligned with `tokens` (the same windows are cut from both). decode: token id -> text, for the specialisation lists.
    passages: how many of the pass's full windows to record token by token (a seeded choice,
    `report.passages`; none for a dense model), each cut to its first `passage_tokens` tokens;
    pieces: token ids -> the text of each token (data.tokenizer.token_texts; default: the ids).
    """
    from .data.shards import eval_windows

    device = torch.device(device)
    moe_layers = _moe_layers(model)
    vocab = model.cfg.vocab_size
    n_dom = len(domain_names) if domain_names else 0
    if domains is not None and len(domains) != len(tokens):
        domains = None  # NOTE: a domain file that does not align is ignored rather than misread
    accs = [_LayerAccumulator(i, layer.n_experts, vocab, n_dom, device) for i, layer in moe_layers]
    batches = eval_windows(tokens, seq_len, batch_size, n_batches=n_batches, seed=seed)
    dom_batches = (eval_windows(domains, seq_len, batch_size, n_batches=n_batches, seed=seed)
                   if domains is not None and n_dom else None)
    total_batches = n_batches if n_batches is not None else math.ceil((len(tokens) - 1) / seq_len / batch_size)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    # the recorded windows: a seeded choice among the full windows, as {batch: [(window, row)]}
    n_full = n_batches * batch_size if n_batches is not None else (len(tokens) - 1) // seq_len
    chosen: dict[int, list[tuple[int, int]]] = {}
    if moe_layers and passages > 0 and n_full > 0:
        rng = np.random.default_rng([seed % 2**64, PASSAGE_STREAM])
        for w in sorted(int(v) for v in rng.choice(n_full, size=min(passages, n_full), replace=False)):
            chosen.setdefault(w // batch_size, []).append((w, w % batch_size))
    shown: list[Passage] = []
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    import time

    t0 = time.perf_counter()
    micro = max(1, micro_batch or batch_size)
    with _recording(model, moe_layers), torch.no_grad():
        for b, (xb, yb) in enumerate(batches):
            domb = next(dom_batches)[0].to(device) if dom_batches is not None else None
            for first in range(0, xb.shape[0], micro):
                x, y = xb[first:first + micro].to(device), yb[first:first + micro].to(device)
                dom = domb[first:first + micro] if domb is not None else None
                with amp():
                    out = model(x)
                nll += F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1),
                                       reduction="sum").double()
                count += y.numel()
                for acc, (_, layer), stats in zip(accs, moe_layers, out.moe_stats):
                    acc.add(stats, layer.last_assignments, x, dom)
                for w, row in chosen.get(b, []):
                    if not first <= row < first + x.shape[0]:
                        continue
                    n = min(passage_tokens, x.shape[1])
                    names = []
                    if dom is not None:
                        names = [domain_names[d] for d in dict.fromkeys(dom[row - first, :n].tolist()) if d < n_dom]
                    shown.append(_passage(moe_layers, x, row - first, n, f"window {w} of the pass (batch {b}, row {row})",
                                          pieces, names))
            if progress is not None:
                progress(b + 1, total_batches)
    loss = float(nll) / max(count, 1)
    windows = "all" if n_batches is None else f"sample of {n_batches} batches x {batch_size} windows (seed {seed})"
    layers = [_layer_report(a, domain_names, decode) for a in accs]
    return EvalReport(split="", loss=loss, ppl=perplexity(loss), n_tokens=count, windows=windows,
                      layers=layers, seconds=time.perf_counter() - t0, passages=shown)


def route_text(model, ids: list[int], *, seq_len: int, pieces: Optional[Callable[[list[int]], list[str]]] = None,
               device: torch.device | str = "cpu", amp_dtype=None) -> list[Passage]:
    """Route a token sequence (the user's own text) and record it token by token.

    ids: token ids (1 or more). They are cut into pieces of at most `seq_len` tokens, each run as
    its own batch of one row through the same forward and recording as `evaluate_model`'s
    passages; returns one Passage per piece (source "text"), [] for a dense model.
    NOTE: under expert choice, routing depends on the batch: here the batch is the piece alone.
    """
    device = torch.device(device)
    moe_layers = _moe_layers(model)
    if not moe_layers:
        return []
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    out: list[Passage] = []
    with _recording(model, moe_layers), torch.no_grad():
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len]
            x = torch.tensor([chunk], dtype=torch.long, device=device)
            with amp():
                model(x)
            source = "text" if len(ids) <= seq_len else f"text, tokens {start}-{start + len(chunk) - 1}"
            out.append(_passage(moe_layers, x, 0, len(chunk), source, pieces, []))
    return out


PASSAGE_STREAM = 17  # the passages' random stream, apart from eval_windows' own


def _moe_layers(model) -> list[tuple[int, Any]]:
    """(block index, MoE layer) of each MoE layer of the model, in block order."""
    return list(zip(model.moe_layer_ids(), model.moe_layers()))


@contextmanager
def _recording(model, moe_layers):
    """Eval mode with every MoE layer recording its assignments; restores both afterwards."""
    was_training = model.training
    model.eval()
    for _, layer in moe_layers:
        layer.record = True
    try:
        yield
    finally:
        for _, layer in moe_layers:
            layer.record, layer.last_assignments, layer.last_weights, layer.last_dropped = False, None, None, None
        model.train(was_training)


def _passage(moe_layers, x: torch.Tensor, row: int, n: int, source: str,
             pieces: Optional[Callable[[list[int]], list[str]]], domains: list[str]) -> Passage:
    """Row `row` of batch x (B, L), first n tokens, as the MoE layers of the last forward routed it."""
    L = x.shape[1]
    ids = [int(v) for v in x[row, :n].tolist()]
    layers = []
    for i, layer in moe_layers:
        token, expert = (t.cpu() for t in layer.last_assignments)
        weight = layer.last_weights.float().cpu()
        sel = (token // L == row) & (token % L < n)
        pos, e, w = (token[sel] % L).tolist(), expert[sel].tolist(), weight[sel].tolist()
        experts: list[list[int]] = [[] for _ in range(n)]
        weights: list[list[float]] = [[] for _ in range(n)]
        for k in sorted(range(len(pos)), key=lambda k: (pos[k], -w[k])):  # by weight, descending
            experts[pos[k]].append(int(e[k]))
            weights[pos[k]].append(round(float(w[k]), WEIGHT_DIGITS))
        dropped: list[list[int]] = [[] for _ in range(n)]
        if layer.last_dropped is not None:
            d_tok, d_exp = (t.cpu() for t in layer.last_dropped)
            d_sel = (d_tok // L == row) & (d_tok % L < n)
            for p, ex in zip((d_tok[d_sel] % L).tolist(), d_exp[d_sel].tolist()):
                dropped[p].append(int(ex))
        layers.append(PassageLayer(layer=i, top1=[ex[0] if ex else None for ex in experts], experts=experts,
                                   weights=weights, dropped=dropped))
    text = pieces(ids) if pieces is not None else [str(t) for t in ids]
    return Passage(source=source, ids=ids, text_tokens=text, domains=domains, layers=layers)


def _layer_report(a: _LayerAccumulator, domain_names: Optional[list[str]], decode) -> LayerReport:
    load = a.load.cpu().numpy()
    imp = a.importance.cpu().numpy()
    E = a.E
    total = load.sum()
    share = load / total if total > 0 else np.full(E, 1.0 / E)
    imp_share = imp / imp.sum() if imp.sum() > 0 else np.full(E, 1.0 / E)
    rep = LayerReport(
        layer=a.layer, load=[int(v) for v in load], load_share=[float(v) for v in share],
        importance_share=[float(v) for v in imp_share], cv_load=_cv(load), cv_importance=_cv(imp),
        max_mean=float(load.max() / load.mean()) if total > 0 else 1.0,
        dropped_pct=100.0 * a.dropped / max(a.weight, 1), entropy=a.entropy / max(a.weight, 1),
        dead=[e for e in range(E) if load[e] == 0],
        starved=[e for e in range(E) if share[e] < STARVED / E],
    )
    te = a.token_expert.reshape(E, a.V).cpu().numpy()
    occurrences = a.token_count.cpu().numpy()  # how often each token id was evaluated
    for e in range(E):
        top = np.argsort(-te[e], kind="stable")[:TOP_TOKENS]
        rep.top_tokens.append([(_show(decode, int(t)), int(te[e, t])) for t in top if te[e, t] > 0])
        # share of the token's occurrences sent to e (top-k: a token goes to k experts, so the
        # shares of one token sum to k); ties broken by how often the token came
        frac = np.where(occurrences >= MIN_COUNT_SELECTIVE, te[e] / np.maximum(occurrences, 1), 0.0)
        sel = np.lexsort((-occurrences, -frac))[:TOP_TOKENS]
        rep.selective_tokens.append([(_show(decode, int(t)), round(float(frac[t]), 4)) for t in sel if frac[t] > 0])
    if domain_names:
        de = a.domain_expert.reshape(-1, E).cpu().numpy()
        for d, name in enumerate(domain_names):
            n = de[d].sum()
            if n > 0:
                rep.domain_share[name] = [round(float(v), 5) for v in de[d] / n]
                rep.domain_assignments[name] = int(n)
    return rep


def _visible(token: str) -> str:
    """A token as printable text: spaces as ·, newlines and tabs escaped."""
    return (token.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("[", "\\[")) or "∅"


def _show(decode, token_id: int) -> str:
    if decode is None:
        return str(token_id)
    return decode(token_id)


# ---------------------------------------------------------------------------------------------
# the command

RUN_SAMPLE = -1  # run_eval's n_batches for the run's own evaluation sample (train.eval_batches, seed train.seed)


def check_options(*, split: str = "val", batches: Optional[int] = None, all_tokens: bool = False,
                  device: str = "auto", data_dir: Optional[Path] = None,
                  out_dir: Optional[Path] = None) -> Optional[int]:
    """`moe-lm eval`'s options, checked before any work (ConfigError naming the option): --all and
    --batches N contradict each other, N in [1, 2^20], a known split and device, an existing data
    folder, an output folder that is not a file. Returns run_eval's n_batches for them: None for
    every token (--all), N for a seeded sample of N batches, RUN_SAMPLE for neither."""
    from . import checks
    from .errors import ConfigError

    if all_tokens and batches is not None:
        raise ConfigError("--all and --batches contradict each other", "pass one of them")
    checks.option_number("--batches", batches, 1, 2**20, integer=True, hint="or pass --all for the whole split")
    checks.choice("--split", split, ("val", "test", "train"))
    checks.device("--device", device)
    checks.in_folder("--data", data_dir, "pass a folder written by `moe-lm prepare`")
    checks.out_folder("--out", out_dir)
    return None if all_tokens else (batches if batches is not None else RUN_SAMPLE)


def data_fingerprint(data_dir: Path) -> Optional[str]:
    """sha256 of `data_dir`'s meta.json, which lists every file's checksum and the time it was
    prepared: equal only for the same data, wherever the folder is and whatever path names it
    (compare-dense's eval cache). None when there is no meta.json to read."""
    try:
        return sha256_file(Path(data_dir) / "meta.json")
    except OSError:
        return None


def run_eval(path: Path | str, *, split: str = "val", n_batches: Optional[int] = RUN_SAMPLE,
             data_dir: Optional[Path] = None,
             out_dir: Optional[Path] = None, device: str = "auto", console: Any = None,
             write: bool = True, passages: int = N_PASSAGES, text: Optional[str] = None,
             html: Path | str | bool | None = None) -> tuple[EvalReport, dict]:
    """Load a run / checkpoint, evaluate it on `split`, write eval.json and the load heatmap.

    n_batches: RUN_SAMPLE (-1) = the trainer's own evaluation sample (train.eval_batches, seed
    train.seed); None = every token of the split; N = a seeded sample of N batches. passages: how many of the
    pass's windows `report.passages` records token by token; text: the user's own text to record
    instead (see `read_user_text`; cut after MAX_TEXT_TOKENS tokens). html: also write the routing
    page (`moe_lm.routing_page`): True = <out>/routing.html, or a file path whose folder exists
    (ConfigError otherwise, raised before any work). Returns (report, files written: name -> path).
    """
    from .data.shards import TokenData
    from .data.tokenizer import eot_id, token_texts
    from .loading import check_same_tokenizer, load_model

    html_path = check_html_path(html) if html not in (None, False, True) else None
    if text is not None and not text.strip():
        raise DataError("the text to show is empty", "pass a file with some text in it with --text, or --prompt TEXT")
    dev, amp_dtype = resolve_device(device, "auto", "--device")
    loaded = load_model(path, device=dev)
    cfg = loaded.cfg
    data_dir = Path(data_dir) if data_dir is not None else Path(cfg.data.dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} (the run's data.dir) does not exist",
                        "pass the data folder the run was trained on with --data DIR, or prepare it with `moe-lm prepare`")
    check_same_tokenizer(loaded, data_dir)
    data = TokenData.open(data_dir)
    if split not in data.splits:
        raise DataError(f"{data_dir} has no {split} split (it has: {', '.join(data.splits)})",
                        "pick one with --split, or prepare the data again with a test fraction")
    tokens = data.split(split)
    tok = loaded.tokenizer()
    batch_size = cfg.train.batch_size  # the trainer's windows, run in its micro-batches (Evaluator)
    micro_batch = max(1, batch_size // cfg.train.grad_accum)
    if n_batches == RUN_SAMPLE:
        n_batches, seed = cfg.train.eval_batches, cfg.train.seed
    else:
        seed = cfg.train.seed
    domains = data.domains(split)
    names = data.domain_names if domains is not None else None

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    def pieces(ids: list[int]) -> list[str]:
        return token_texts(tok, ids)

    quiet = console is None or not console.is_terminal
    with Progress(TextColumn("evaluating"), BarColumn(), TextColumn("{task.completed}/{task.total} batches"),
                  TimeRemainingColumn(), console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task("eval", total=None)
        report = evaluate_model(
            loaded.model, tokens, seq_len=cfg.model.seq_len, batch_size=batch_size, n_batches=n_batches,
            micro_batch=micro_batch, seed=seed,
            domains=domains, domain_names=names, decode=lambda i: tok.decode([i]), device=dev, amp_dtype=amp_dtype,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            passages=0 if text is not None else passages, pieces=pieces,
        )
    if text is not None:
        # NOTE: after EOT, as a document starts in the training data (and as `generate` prompts)
        ids = [eot_id(tok)] + tok.encode(text, add_special_tokens=False).ids
        report.passages = route_text(loaded.model, ids[:MAX_TEXT_TOKENS], seq_len=cfg.model.seq_len, pieces=pieces,
                                     device=dev, amp_dtype=amp_dtype)
        if len(ids) > MAX_TEXT_TOKENS:
            for p in report.passages:
                p.source += f" (the text's first {MAX_TEXT_TOKENS} of {len(ids)} tokens)"
    else:
        for p in report.passages:
            p.source = f"{split} {p.source}"
    report.split, report.checkpoint, report.step, report.data_dir = split, str(loaded.checkpoint), loaded.step, str(data_dir)
    report.data_fingerprint = data_fingerprint(data_dir)
    report.name = cfg.name
    m = cfg.model.moe
    if m is not None:
        report.moe = {"router": m.router, "n_experts": m.n_experts, "top_k": m.top_k,
                      "n_shared_experts": m.n_shared_experts, "capacity_factor": m.capacity_factor}
    files: dict = {}
    if write or html not in (None, False):
        out = Path(out_dir) if out_dir is not None else (loaded.run_dir or loaded.checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        if write:
            files = write_outputs(report, out, title=cfg.name)
        if html not in (None, False):
            from .routing_page import write_page

            files["html"] = write_page(report.to_json(), html_path or out / "routing.html")
    return report, files


def read_user_text(text_file: Optional[Path] = None, prompt: Optional[str] = None) -> Optional[str]:
    """The text `eval --text FILE` / `--prompt TEXT` asks to show, or None for neither.

    Raises ConfigError when both are given, DataError when the file is missing, not UTF-8 text,
    or the text is empty (whitespace only).
    """
    from .errors import ConfigError

    if text_file is not None and prompt is not None:
        raise ConfigError("--text and --prompt contradict each other", "pass one of them")
    if text_file is not None:
        from . import checks

        text_file = Path(text_file)
        checks.in_file("--text", text_file, "pass the path of a UTF-8 text file to --text")
        try:
            text = text_file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise DataError(f"text file {text_file} is not readable UTF-8 text ({type(exc).__name__})",
                            "pass a UTF-8 text file to --text") from exc
        if not text.strip():
            raise DataError(f"text file {text_file} is empty", "pass a file with some text in it")
        return text
    if prompt is not None and not prompt.strip():
        raise DataError("--prompt is empty", "pass some text, e.g. --prompt 'def main():'")
    return prompt


def check_html_path(path: Path | str) -> Path:
    """The routing page's path, checked before any work: its folder must exist and the path must
    not be a folder (ConfigError otherwise)."""
    from .errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--html {path} is a folder", f"name a file, e.g. --html {path / 'routing.html'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--html {path}: the folder {path.parent} does not exist", "create it first or pick another path")
    return path


def write_outputs(report: EvalReport, out_dir: Path, title: str = "") -> dict:
    """eval.json (atomically) and, for an MoE, plots/eval_expert_load.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    path = out_dir / "eval.json"
    files["json"] = write_atomic(path, json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n")
    if report.layers:
        from .plots import plot_eval_load

        files["heatmap"] = plot_eval_load(report, out_dir / "plots" / "eval_expert_load.png", title=title)
    return files


# the routing table's width besides the load bars (layer, five figures, dead/starved, borders: 77 at E = 32)
ROUTING_FIGURES_WIDTH = 80


def render_report(report: EvalReport, console, files: Optional[dict] = None, top_domains: int = 6) -> None:
    """The console view: perplexity, the routing table, specialisation."""
    from rich.table import Table

    from .training.display import heat_row

    console.print(
        f"[bold]{report.split}[/] perplexity [bold]{report.ppl:.2f}[/] (loss {report.loss:.4f} nats/token) over "
        f"{report.n_tokens:,} tokens ({report.windows}); checkpoint {report.checkpoint} (step {report.step})",
        highlight=False, soft_wrap=True)
    if not report.layers:
        console.print("dense model: no routing report")
    else:
        E = len(report.layers[0].load)
        t = Table(title="routing per MoE layer", title_justify="left", caption_justify="left",
                  caption=f"load: one bar per expert (0..{E - 1}), full height = twice the fair share; CV of importance "
                          f"and load and max/mean load as in Shazeer et al. 2017, Table 6; entropy in nats "
                          f"(uniform = {math.log(E):.2f}); starved = under {STARVED:g} x the fair share")
        # NOTE: the figures never shrink to "0.…": on a console too narrow for the bars beside them
        # (80 columns, or a pipe, hold 32 experts' bars or the figures, not both) the bars go below
        bars_beside = console.width >= min(E, 64) + ROUTING_FIGURES_WIDTH
        t.add_column("layer", justify="right", no_wrap=True)
        if bars_beside:
            t.add_column("load", no_wrap=True, min_width=min(E, 64))
        for col in ("CV imp", "CV load", "max/ mean", "drop %", "entropy"):
            t.add_column(col, justify="right", no_wrap=True, min_width=5)
        t.add_column("dead/ starved", justify="right")
        for lr in report.layers:
            flags = ", ".join([f"dead {e}" for e in lr.dead] + [f"starved {e}" for e in lr.starved if e not in lr.dead])
            t.add_row(str(lr.layer), *([heat_row(lr.load_share)] if bars_beside else []), f"{lr.cv_importance:.3f}",
                      f"{lr.cv_load:.3f}", f"{lr.max_mean:.2f}", f"{lr.dropped_pct:.2f}", f"{lr.entropy:.3f}",
                      flags or "-")
        console.print(t)
        if not bars_beside:
            for lr in report.layers:
                console.print(f"load, layer {lr.layer}: ", heat_row(lr.load_share), sep="", soft_wrap=True)
        last = report.layers[-1]
        s = Table(title=f"specialisation, layer {last.layer}: the tokens each expert receives", title_justify="left",
                  caption="most often: by count; most selectively: share of the token's occurrences sent to this "
                          f"expert (tokens seen ≥ {MIN_COUNT_SELECTIVE} times); · = space", caption_justify="left")
        s.add_column("expert", justify="right")
        s.add_column("share", justify="right")
        s.add_column("most often")
        s.add_column("most selectively")
        for e in range(E):
            often = "  ".join(_visible(tok) for tok, _ in last.top_tokens[e][:6])
            sel = "  ".join(f"{_visible(tok)} {f:.0%}" for tok, f in last.selective_tokens[e][:5])
            s.add_row(str(e), f"{last.load_share[e]:.1%}", often, sel)
        console.print(s)
        if last.domain_share:
            # the most specialised among the domains big enough to mean something (≥ 1% of assignments)
            total = sum(last.domain_assignments.values())
            big = [(k, v) for k, v in last.domain_share.items() if last.domain_assignments[k] >= 0.01 * total]
            doms = sorted(big, key=lambda kv: -max(kv[1]))[:top_domains]
            title = (f"domains, layer {last.layer}: share of each domain's assignments per expert (the {len(doms)} "
                     f"most specialised of the {len(big)} domains with ≥ 1% of the tokens; uniform = {1 / E:.0%})")
            cells = [max([len(f"{row[e]:.0%}") for _, row in doms] + [len(str(e))]) for e in range(E)]
            grid_width = max([len(name) for name, _ in doms] + [6]) + 4 + sum(c + 3 for c in cells)
            if console.width >= grid_width:  # a column per expert fits: the whole grid
                d = Table(title=title, title_justify="left")
                d.add_column("domain", no_wrap=True)
                for e in range(E):
                    d.add_column(str(e), justify="right", no_wrap=True)
                for name, row in doms:
                    top = max(row)
                    d.add_row(name, *[(f"[bold]{v:.0%}[/]" if v == top else f"{v:.0%}") for v in row])
            else:  # too narrow for E columns (they would shrink to nothing): each domain's top experts
                d = Table(title=title.replace("per expert", "to its top experts"), title_justify="left")
                d.add_column("domain", no_wrap=True)
                d.add_column("experts by share")
                for name, row in doms:
                    top = sorted(range(E), key=lambda e: -row[e])[:6]
                    d.add_row(name, "  ".join(f"{e}: {row[e]:.0%}" for e in top))
            console.print(d)
    if files:
        console.print("wrote " + ", ".join(str(p) for p in files.values()), highlight=False, soft_wrap=True)

