"""Loading a model checkpoint straight into an FSDP2-sharded model: each rank reads only its shards.

`load_model_from_any` (pretrain/checkpoint.py) gives every rank a whole model, and sharding
it afterwards means that, for a while, each rank holds the whole model next to its shards
(and, from an HF directory, HF's tensors next to the converted ones). `load_sharded`
instead builds the model on the meta device, shards it with the run's plan (Fabric's
setup_module: pretrain/parallel.py) so that each rank allocates only its shards, then fills
them from the checkpoint:

    our consolidated dir   each parameter's rows of this rank, read from model.safetensors
                           straight into the shard (model/tensor_file.py: plain reads, no
                           memory map)
    HF Llama/Mistral dir   each parameter whole (q/k/v and gate/up are concatenated from
                           HF's separate tensors), then this rank's rows kept; a tied model's
                           one embedding/lm_head parameter is read once, from embed_tokens
    training checkpoint    torch.distributed.checkpoint reads this rank's pieces (it reshards)

So a rank's extra memory while loading is its shards, plus one full parameter at a time from
an HF directory (the largest is the embedding). Parameters are fp32 whatever the file's
dtype (a bf16 HF export is upcast exactly), as the engine's master weights always are.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from model import Config, Llama
from model.llama import CONFIG_FILE, WEIGHTS_FILE
from pretrain.checkpoint import MARKER, STATE_DIR, CheckpointError, is_training_checkpoint, resolve_model_dir
from pretrain.engine import shard_model
from pretrain.parallel import unwrap


def read_model_config(path: str | os.PathLike) -> Config:
    """The Config of any checkpoint `load_model_from_any` reads, without reading any weights."""
    from model import hf

    path = resolve_model_dir(path)
    if hf.is_hf_checkpoint(path):
        return hf.config_from_hf(json.loads((path / CONFIG_FILE).read_text()), source=str(path / CONFIG_FILE))
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path / CONFIG_FILE} not found: a model directory needs its config")
    return Config.load(path / CONFIG_FILE)


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows (dim 0) of the full parameter that this rank's shard of `param` holds.

    FSDP2 shards dim 0 like torch.chunk: ceil(rows / n) per shard, the last ones shorter
    or empty. A plain tensor (not sharded) holds all its rows.
    """
    rows = param.shape[0] if param.ndim else 1
    if not isinstance(param, DTensor):
        return 0, rows
    start, size = 0, rows
    coordinate = param.device_mesh.get_coordinate()
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            if placement.dim != 0:
                raise NotImplementedError(f"a shard on dim {placement.dim}: only FSDP2's dim-0 shards are read")
            chunk = math.ceil(size / param.device_mesh.size(dim))
            offset = min(coordinate[dim] * chunk, size)
            start, size = start + offset, min(chunk, size - offset)
    if param.to_local().shape[0] != size:
        raise RuntimeError(f"shard of {tuple(param.shape)} has {param.to_local().shape[0]} rows, expected {size}")
    return start, start + size


def _check_names(model: nn.Module, found: set[str], config: Config, source: str) -> None:
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match config {config.name!r}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def _check_shape(name: str, shape, param: torch.Tensor, config: Config, source: str) -> None:
    if tuple(shape) != tuple(param.shape):
        raise ValueError(f"{source}: {name} has shape {tuple(shape)}, config {config.name!r} expects "
                         f"{tuple(param.shape)}")


@torch.no_grad()
def _fill_from_safetensors(model: nn.Module, path: Path, config: Config) -> None:
    from model.tensor_file import TensorFile

    source = str(path)
    weights = TensorFile(path)
    _check_names(model, set(weights.keys()), config, source)
    for name, param in model.named_parameters():
        _check_shape(name, weights.shape(name), param, config, source)
        start, stop = local_rows(param)
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.device.type == "cpu" and local.dtype == weights.dtype(name) and local.is_contiguous():
            weights.read_into(name, local, start)  # straight into the shard: no temporary copy
        else:
            local.copy_(weights.read(name, start, stop).reshape(local.shape))


@torch.no_grad()
def _fill_from_hf(model: nn.Module, directory: Path, config: Config) -> None:
    from model import hf

    source = str(directory)
    tensors = hf.HFTensors(directory)
    names = set(hf.our_names(config))
    for name, param in model.named_parameters():
        if name not in names:
            raise ValueError(f"{source}: our model has {name}, which has no HF counterpart")
        full = hf.tensor_from_hf(name, tensors, source=source)
        if name == "embed.weight" and full.shape[0] != config.vocab_size:
            raise ValueError(f"{directory / CONFIG_FILE}: vocab_size {config.vocab_size} but embed_tokens has "
                             f"{full.shape[0]} rows")
        if name == "embed.weight":
            hf.check_tie(tensors, config, full, source=str(directory / CONFIG_FILE))
        _check_shape(name, full.shape, param, config, source)
        start, stop = local_rows(param)
        local = param.to_local() if isinstance(param, DTensor) else param
        local.copy_(full[start:stop].reshape(local.shape))
        del full  # one full parameter at a time


def _fill_from_training_checkpoint(model: nn.Module, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    # Fabric saved {"model": {...}, "optimizer": {...}, ...}; asking for "model" only reads the
    # weights, and DCP reads just the pieces that overlap this rank's shards.
    state = {"model": get_model_state_dict(model)}
    try:
        dcp.load(state, checkpoint_id=str(path / STATE_DIR))
    except Exception as e:  # DCP errors are long; name the checkpoint first
        raise CheckpointError(f"{path / STATE_DIR}: could not read model weights ({type(e).__name__}: {e})") from e
    set_model_state_dict(model, state["model"])


def load_sharded(fabric, path: str | os.PathLike, kernels: str = "auto", config: Config | None = None,
                 convert=None) -> nn.Module:
    """The model of checkpoint `path` (any layout `load_model_from_any` reads), sharded on `fabric`
    exactly as `shard_model(fabric, load_model_from_any(path))` would be, without any rank
    holding the full weights (collective: every rank calls it). `config` replaces the checkpoint's
    (the same shapes; pretraining's --init-from with another --block-size). `convert` (--fp8's)
    changes the meta build's modules in place before sharding, keeping the parameter names."""
    from model import hf

    path = resolve_model_dir(path)
    config = config or read_model_config(path)
    if hf.is_hf_checkpoint(path):
        fill = functools.partial(_fill_from_hf, directory=path, config=config)
    elif (path / WEIGHTS_FILE).is_file():
        fill = functools.partial(_fill_from_safetensors, path=path / WEIGHTS_FILE, config=config)
    elif is_training_checkpoint(path):
        fill = functools.partial(_fill_from_training_checkpoint, path=path)
    else:
        raise FileNotFoundError(f"{path / WEIGHTS_FILE} not found: a consolidated checkpoint needs {CONFIG_FILE} "
                                f"and {WEIGHTS_FILE}; a training checkpoint needs {MARKER} and {STATE_DIR}/")
    with torch.device("meta"):
        model = Llama(config, kernels=kernels)
    if convert is not None:
        convert(model)
    wrapped = shard_model(fabric, model)
    fill(unwrap(wrapped))
    return wrapped
