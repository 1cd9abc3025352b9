"""Checkpoints: sharded training checkpoints written atomically, and the consolidated model.

A training checkpoint is a directory OUT/checkpoints/step-NNNNNN/:

    state/            distributed checkpoint (one file per rank + .metadata) with the model
                      and AdamW state as DTensor shards, plus Fabric's meta.pt holding
                      `train_state` (step, tokens seen, next sample index, skip counters)
    rng/rank-RRRRR.pt every rank's torch / numpy / python (/ cuda) RNG state
    config.json       the model Config
    args.json         the command-line settings of the run
    tokenizer.model   when the run was given --tokenizer: its files as data_prep/tokenizer.py
    (or .json)        finds them (tokenizer.model or tokenizer.json, with tokenizer_config.json,
                      special_tokens_map.json and generation_config.json when it has them)
    meta.json         step, tokens seen, world size, time (for people and tools)
    COMPLETE          written last; a directory without it is never resumed from

It is written under the hidden name .step-NNNNNN.tmp and renamed by rank 0 after every
rank has finished (barrier) and the marker is on disk, so a crash mid-write leaves only a
.tmp directory, which `--resume auto` ignores (and reports). Distributed checkpoints can
be loaded on a different number of ranks (DCP reshards).

Shared with finetune/: `save_consolidated`, `load_model_from_any`, `resolve_model_dir`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from model import Config, Llama
from model.llama import CONFIG_FILE, WEIGHTS_FILE
from pretrain.parallel import unwrap

STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"
STATE_DIR = "state"
TOKENIZER_FILE = "tokenizer.model"  # or tokenizer.json: data_prep.tokenizer.tokenizer_files finds either


def copy_tokenizer(tokenizer: str | os.PathLike, directory: Path) -> None:
    """The files of the tokenizer at `tokenizer` (a file or a directory) into `directory`,
    under their canonical names."""
    from data_prep.tokenizer import tokenizer_files

    files = tokenizer_files(tokenizer)
    if not files:
        raise FileNotFoundError(f"tokenizer {tokenizer}: no such file (nor a directory holding tokenizer.json "
                                f"or tokenizer.model)")
    for name, source in files.items():
        shutil.copyfile(source, directory / name)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ---- finding checkpoints -------------------------------------------------------------------
def list_checkpoints(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete checkpoint dirs sorted by step, incomplete or half-written dirs) under `root`."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    complete, incomplete = [], []
    for path in root.iterdir():
        if not path.is_dir():
            continue
        if STEP_DIR.match(path.name) and (path / MARKER).is_file():
            complete.append(path)
        elif path.name.startswith((".step-", "step-")):
            incomplete.append(path)
    complete.sort(key=lambda p: int(STEP_DIR.match(p.name).group(1)))
    return complete, sorted(incomplete)


def find_latest(root: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint under `root` (or None), and the incomplete ones skipped."""
    complete, incomplete = list_checkpoints(root)
    return (complete[-1] if complete else None), incomplete


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() and (path / STATE_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def resolve_resume(resume: str | None, ckpt_root: Path) -> tuple[Path | None, list[Path]]:
    """--resume: None → fresh start; "auto" → newest complete under ckpt_root (None if none);
    a path → that checkpoint, which must be complete."""
    if resume is None:
        return None, []
    if resume == "auto":
        return find_latest(ckpt_root)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint directory")
    if not is_training_checkpoint(path):
        raise CheckpointError(f"--resume {path}: not a complete training checkpoint (needs {MARKER}, "
                              f"{STATE_DIR}/ and {CONFIG_FILE}); a directory without {MARKER} was cut off mid-write")
    return path, []


# ---- RNG -----------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- training checkpoints ------------------------------------------------------------------
def save_training_checkpoint(fabric, ckpt_root: Path, step: int, model, optimizer, train_state: dict,
                             config: Config, args: dict, tokenizer: str | os.PathLike | None = None,
                             keep_last: int = 0) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically on all ranks (collective); returns its path.

    `keep_last` > 0 deletes the oldest complete checkpoints beyond the newest K.
    """
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".{final.name}.tmp"
    if fabric.global_rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from a crash
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    fabric.barrier()

    fabric.save(tmp / STATE_DIR, {"model": model, "optimizer": optimizer, "train_state": train_state})
    torch.save(rng_state(), tmp / "rng" / f"rank-{fabric.global_rank:05d}.pt")
    fabric.barrier()

    if fabric.global_rank == 0:
        config.save(tmp / CONFIG_FILE)
        _write_durable(tmp / "args.json", json.dumps(args, indent=2, default=str) + "\n")
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
        meta = {"step": step, "tokens_seen": train_state.get("tokens_seen"),
                "next_sample_index": train_state.get("next_sample_index"),
                "world_size": fabric.world_size, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_durable(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        _fsync_dir(tmp / STATE_DIR)
        _fsync_dir(tmp)
        _write_durable(tmp / MARKER, "")  # last: its presence means everything above is on disk
        _fsync_dir(tmp)
        old = None
        if final.exists():  # the same step saved again (e.g. a rerun): swap, then delete the old one
            old = ckpt_root / f".{final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:
            complete, _ = list_checkpoints(ckpt_root)
            for stale in complete[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()
    return final


def load_training_checkpoint(fabric, path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; returns the train_state dict."""
    path = Path(path)
    state = {"model": model, "optimizer": optimizer, "train_state": {}}
    try:
        fabric.load(path / STATE_DIR, state)
    except Exception as e:  # DCP errors are long; name the checkpoint first
        raise CheckpointError(f"{path}: could not load the training checkpoint ({type(e).__name__}: {e})") from e
    rng_file = path / "rng" / f"rank-{fabric.global_rank:05d}.pt"
    if not rng_file.is_file():  # resumed on more ranks than saved: fall back to rank 0's stream
        rng_file = path / "rng" / "rank-00000.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state["train_state"]


def read_training_checkpoint_model(path: str | os.PathLike, kernels: str = "auto") -> Llama:
    """The model weights of a training checkpoint as a plain Llama on CPU, without a process group."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_training_checkpoint(path):
        raise CheckpointError(f"{path}: not a complete training checkpoint (needs {MARKER}, {STATE_DIR}/, {CONFIG_FILE})")
    config = Config.load(path / CONFIG_FILE)
    model = Llama(config, kernels=kernels)
    # Fabric saved {"model": {...}, "optimizer": {...}}; DCP flattens the nesting, so asking
    # for {"model": ...} reads only the weights.
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path / STATE_DIR), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{path / STATE_DIR}: could not read model weights ({type(e).__name__}: {e})") from e
    model.load_state_dict(state["model"])
    return model


# ---- consolidated models ------------------------------------------------------------------
def write_consolidated(model: Llama, directory: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                       extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Llama.save format (+ the tokenizer's files, extra files) into `directory`, atomically as a whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save(tmp)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        _fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def save_consolidated(fabric, model, directory: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                      extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Gather the sharded model's full weights (collective: call on every rank) and have rank 0
    write them in the Llama.save format (config.json + model.safetensors + the tokenizer's files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap(model)
    state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if fabric.global_rank == 0:
        plain = Llama.from_state_dict(inner.config, state, kernels=getattr(inner, "kernels", "auto"))
        write_consolidated(plain, directory, tokenizer=tokenizer, extra_files=extra_files)
    fabric.barrier()
    return Path(directory)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The directory whose weights `load_model_from_any(path)` reads (its tokenizer and chat
    template sit beside them): `path` itself, or a pretraining output dir's final/ or newest checkpoint."""
    from model import hf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    if not path.is_dir():
        raise ValueError(not_a_model_directory(path))
    if hf.is_hf_checkpoint(path) or ((path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()) \
            or is_training_checkpoint(path):
        return path
    if (path / "final" / WEIGHTS_FILE).is_file():
        return path / "final"
    latest, _ = find_latest(path / "checkpoints")
    if latest is not None:
        return latest
    raise ValueError(f"{path}: not a model directory; expected an HF Llama dir, a consolidated dir "
                     f"({CONFIG_FILE} + {WEIGHTS_FILE}), a training checkpoint (step-NNNNNN with {MARKER}) "
                     f"or a pretraining output dir (final/ or checkpoints/)")


def not_a_model_directory(path: Path) -> str:
    """Why a file given where a checkpoint directory belongs cannot be read, and what to do instead."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        return (f"{path}: a GGUF file (llama.cpp's format), not a model directory; convert it to an HF "
                f"directory first, e.g. with transformers (pip install gguf): AutoModelForCausalLM."
                f"from_pretrained(DIR, gguf_file=NAME) then save_pretrained(OUT), and pass OUT")
    return (f"{path}: a file, not a model directory; pass the directory that holds it (an HF Llama/Mistral "
            f"dir with config.json, a consolidated dir with {CONFIG_FILE} + {WEIGHTS_FILE}, or a training "
            f"checkpoint step-NNNNNN)")


def load_model_from_any(path: str | os.PathLike, kernels: str = "auto") -> Llama:
    """A Llama on CPU from: an HF Llama dir, our consolidated dir (config.json + model.safetensors),
    a training checkpoint dir (step-NNNNNN), or a training output dir (its final/ or newest checkpoint)."""
    from model import hf

    path = resolve_model_dir(path)
    if hf.is_hf_checkpoint(path):
        return hf.load_hf(path, kernels=kernels)
    if is_training_checkpoint(path) and not (path / WEIGHTS_FILE).is_file():
        return read_training_checkpoint_model(path, kernels=kernels)
    return Llama.load(path, kernels=kernels)
