"""Export a trained model as a Hugging Face `transformers` folder.

    export_hf("runs/tiny-moe", "exports/tiny-moe")   # -> ExportResult (architecture, files, ...)

The folder loads offline with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`:

    config.json              the architecture and its hyper-parameters
    model.safetensors        float32 weights, experts stored one per module (the on-disk layout
                             that transformers 5.x fuses into (E, 2h, d) / (E, d, h) when loading)
    generation_config.json   bos = eos = pad = <|endoftext|>
    tokenizer.json           the run's byte-level BPE, plus a post-processor that puts <|endoftext|>
                             before the text: `moe-lm generate`'s prompt convention (the document
                             start seen in training), so AutoTokenizer(prompt) + model.generate gives
                             the tokens `moe-lm generate --temperature 0` gives
    tokenizer_config.json    PreTrainedTokenizerFast, bos = eos <|endoftext|>, no added prefix space
    moe_lm.json              the resolved moe-lm config, the step and the files' sha256, so that
                             `moe-lm eval DIR` and `generate DIR` read the export back exactly

Which transformers architecture, and the tensors' names and layout: `moe_lm.hf_format`.
Reading such a folder back: `loading.load_model` (via `loading.load_hf_folder`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, to_dict
from .errors import ExportError
from .files import fsync_dir, fsync_file, save_safetensors, sha256_file
from .hf_format import EOT, FORMAT, META, hf_state_dict, hf_target


@dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    checkpoint: Path  # the checkpoint exported
    step: int
    n_params: int
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# write


def _tokenizer_config(seq_len: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "pad_token": EOT, "bos_token": EOT,
            "unk_token": None, "model_max_length": seq_len, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False}


def write_hf_tokenizer(tokenizer_path: Path, out: Path) -> int:
    """The run's tokenizer.json, with a post-processor that puts <|endoftext|> before every text
    (`moe-lm generate`'s prompt convention: the document start the model saw in training), so that
    `AutoTokenizer(prompt)` gives the ids `moe-lm generate` feeds the model. Vocabulary, merges,
    pre-tokenizer and decoder are the run's, unchanged. Returns the end-of-text id."""
    from tokenizers import Tokenizer, processors

    from .data.tokenizer import load_tokenizer

    eot = load_tokenizer(tokenizer_path).token_to_id(EOT)  # checks it (DataError when damaged)
    tok = Tokenizer.from_file(str(tokenizer_path))  # as stored: load_tokenizer's runtime settings left out
    bos = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, eot)])
    tok.post_processor = bos if tok.post_processor is None else processors.Sequence([tok.post_processor, bos])
    tok.save(str(out))
    return eot


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(path: Path | str, out_dir: Path | str, overwrite: bool = False) -> ExportResult:
    """A run folder (its latest checkpoint) or checkpoint folder -> a transformers folder at `out_dir`."""
    from .loading import load_model

    _check_out(Path(out_dir), overwrite)
    loaded = load_model(path, device="cpu")
    return write_hf_folder(loaded.model, loaded.cfg, loaded.tokenizer_path, out_dir, overwrite=overwrite,
                           step=loaded.step, source=loaded.checkpoint)


def _check_out(out_dir: Path, overwrite: bool) -> None:
    from .checks import out_folder

    out_folder("--out", out_dir)  # not a file, nor under one
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out_dir} exists and is not empty", "pass --overwrite to replace it")
        if not (out_dir / META).is_file():  # --overwrite replaces an export, never any other folder
            raise ExportError(f"refusing to replace {out_dir}: it is not a folder `moe-lm export` wrote (no {META})",
                              "choose another --out, or empty the folder yourself")


def write_hf_folder(model, cfg: Config, tokenizer_path: Path, out_dir: Path | str, overwrite: bool = False,
                    step: int = 0, source: Path | str = "") -> ExportResult:
    """Write `model` (a Transformer of `cfg.model`) and its tokenizer as a transformers folder.

    Written into a temporary folder next to `out_dir`, then renamed into place: a failure or a
    kill leaves no half-written export. An existing non-empty `out_dir` needs `overwrite`.
    """
    from .data.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    target = hf_target(cfg.model)
    load_tokenizer(tokenizer_path)  # a damaged tokenizer is refused before anything is written
    tensors = hf_state_dict(model, target)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        eot = write_hf_tokenizer(tokenizer_path, tmp / "tokenizer.json")
        config = dict(target.config, architectures=[target.architecture], model_type=target.model_type,
                      bos_token_id=eot, eos_token_id=eot, pad_token_id=None)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(cfg.model.seq_len))
        _write_json(tmp / META, {
            "format": FORMAT, "architecture": target.architecture, "step": step, "exported_from": str(source),
            "config": to_dict(cfg),
            "files": {n: sha256_file(tmp / n) for n in ("model.safetensors", "tokenizer.json")},
        })
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)  # NOTE: two renames; a kill between them leaves the old one aside
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir=out_dir, architecture=target.architecture, checkpoint=Path(source), step=step,
                        n_params=model.num_params(), files=sorted(p.name for p in out_dir.iterdir()))


