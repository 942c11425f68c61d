"""Open a trained model for inference: eval, generate and export all start here.

    loaded = load_model("runs/tiny-moe")             # a run folder -> its latest checkpoint
    loaded = load_model("runs/tiny-moe/checkpoints/step-0000300")
    loaded = load_model("exports/tiny-moe")           # a `moe-lm export` folder (load_hf_folder)
    loaded.model(idx)                                 # Transformer in eval mode, on `device`

A checkpoint carries everything needed: its resolved config.yaml, model.safetensors and a copy of
the tokenizer. Every file is checked against state.json's sizes and checksums before use, so a
truncated or corrupt checkpoint is a CheckpointError (one line, exit 2), never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from .config import Config, from_dict, validate
from .errors import CheckpointError, ConfigError, DataError, ExportError
from .files import sha256_file
from .hf_format import META, hf_target, load_hf_state_dict
from .training import checkpoint as ckpt_io


@dataclass
class Loaded:
    """A model ready for inference, and where it came from."""

    model: Any  # moe_lm.model.transformer.Transformer, eval mode
    cfg: Config
    checkpoint: Path
    run_dir: Optional[Path]  # the run folder holding the checkpoint, when there is one
    step: int
    state: dict  # the checkpoint's state.json
    tokenizer_path: Path

    def tokenizer(self):
        """The checkpoint's (or export's) tokenizer; CheckpointError when its tokenizer.json is damaged."""
        from .data.tokenizer import load_tokenizer

        try:
            return load_tokenizer(self.tokenizer_path)
        except DataError as exc:
            raise CheckpointError(exc.message,
                                  "use another checkpoint of the run, or retrain from data prepared again") from exc


def load_model(path: Path | str, device: str | torch.device = "cpu") -> Loaded:
    """A run folder (its latest checkpoint) or a checkpoint folder -> Loaded (model in eval mode)."""
    path = Path(path)
    if not path.exists():
        from .checks import blocking_file

        blocker = blocking_file(path)
        what = f"{path}: {blocker} is a file, not a folder" if blocker is not None else f"{path} does not exist"
        raise CheckpointError(what, "pass a run folder (runs/<name>) or a checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a run, checkpoint or export folder",
                              "pass a run folder (runs/<name>), a checkpoint folder or a `moe-lm export` folder")
    if (path / "config.json").is_file() and not (path / "state.json").is_file():  # a `moe-lm export` folder
        return load_hf_folder(path, device)
    ckpt = ckpt_io.resolve_checkpoint(path)
    state = ckpt_io.read_state(ckpt)  # sizes and checksums of every file, before any use
    cfg = _checkpoint_config(ckpt)
    from .model.transformer import Transformer

    model = Transformer(cfg.model)
    try:
        ckpt_io.load_weights(model, ckpt / "model.safetensors")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read the weights is the checkpoint's
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded ({type(exc).__name__})",
                              "use another checkpoint of the run") from exc
    model.to(device).eval()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    tok = ckpt / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer.json", "use another checkpoint of the run")
    return Loaded(model=model, cfg=cfg, checkpoint=ckpt, run_dir=run_dir, step=int(state["step"]),
                  state=state, tokenizer_path=tok)


def _checkpoint_config(ckpt: Path) -> Config:
    try:
        raw = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
        cfg = from_dict(raw)
        validate(cfg)
    except (OSError, yaml.YAMLError, ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has no readable config.yaml ({type(exc).__name__})",
                              "use another checkpoint of the run") from exc
    if cfg.model.vocab_size is None:
        raise CheckpointError(f"checkpoint {ckpt}'s config.yaml does not record model.vocab_size",
                              "use a checkpoint written by `moe-lm train`")
    return cfg


def same_tokenizer(a: Path, b: Path) -> bool:
    """The same tokenizer.json, or the same but for the post-processor (an export adds one that
    puts <|endoftext|> first; it changes no id of any text)."""
    if sha256_file(a) == sha256_file(b):
        return True
    try:
        ja, jb = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (a, b))
    except (OSError, ValueError):
        return False
    for j in (ja, jb):
        j.pop("post_processor", None)
    return ja == jb


def check_same_tokenizer(loaded: Loaded, data_dir: Path) -> None:
    """The data folder must be tokenised with the checkpoint's tokenizer (same ids for the same text)."""
    from .data.shards import TokenData

    data = TokenData.open(data_dir)
    if data.vocab_size != loaded.cfg.model.vocab_size or not same_tokenizer(data.tokenizer_path, loaded.tokenizer_path):
        raise DataError(
            f"{data_dir} was tokenised with another tokenizer ({data.vocab_size} tokens) than the model in "
            f"{loaded.checkpoint} ({loaded.cfg.model.vocab_size} tokens)",
            "evaluate on the data folder the run was trained on (--data DIR), or prepare one with "
            f"`moe-lm prepare --tokenizer {loaded.tokenizer_path}`",
        )


# ---------------------------------------------------------------------------------------------
# a `moe-lm export` folder (moe_lm.hf_format)


def load_hf_folder(path: Path | str, device: str | torch.device = "cpu") -> Loaded:
    """A folder written by `export.export_hf` -> Loaded (our Transformer, eval mode, on `device`).

    Its moe_lm.json gives the config; the files it lists must match their sha256, config.json
    must name the architecture that config exports as, and the tensors must fit it exactly
    (CheckpointError otherwise: export the run again)."""
    from safetensors.torch import load_file

    from .model.transformer import Transformer

    path = Path(path)
    hint = "export the run again with `moe-lm export`, or pass a run or checkpoint folder"
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        cfg: Config = from_dict(meta["config"])
    except FileNotFoundError:
        raise CheckpointError(f"{path} has a config.json but no {META}: not written by `moe-lm export`",
                              "load it with transformers, or pass a run or checkpoint folder") from None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}/{META} is not readable ({type(exc).__name__})", hint) from exc
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(f"export {path} is truncated or changed ({name} "
                                  f"{'is missing' if not f.is_file() else 'does not match its checksum'})", hint)
    try:
        target = hf_target(cfg.model)
        written = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (ExportError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a moe-lm export ({exc})", hint) from exc
    if written != [target.architecture]:
        raise CheckpointError(f"{path}/config.json names {written}, but its moe-lm config exports as "
                              f"{target.architecture}", hint)
    model = Transformer(cfg.model)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - any failure to read the weights is the export's
        raise CheckpointError(f"{path}/model.safetensors cannot be read ({type(exc).__name__})", hint) from exc
    load_hf_state_dict(model, tensors, target, str(path))
    model.to(device).eval()
    return Loaded(model=model, cfg=cfg, checkpoint=path, run_dir=None, step=int(meta.get("step", 0)), state=meta,
                  tokenizer_path=path / "tokenizer.json")
