"""Reading single tensors, or a range of their rows, out of a safetensors file.

A safetensors file is an 8-byte little-endian header length, a JSON header (name → dtype,
shape, byte offsets) and the raw tensor bytes. Reading a tensor here is one seek and one
`readinto` straight into a fresh tensor: no memory map (whose touched pages would count
against the process's resident memory while the file is open) and never more than the
rows asked for. pretrain/sharded_load.py uses it so that each rank reads only its shards.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class TensorFile:
    """The tensors of one safetensors file, read on demand (`keys`, `shape`, `read`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: not a safetensors file (unreadable header: {e})") from e
        self.data_start = 8 + length
        header.pop("__metadata__", None)
        self.entries = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str) -> dict:
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: {name} has dtype {entry['dtype']}, which is not supported")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)["dtype"]]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop (along dim 0) of tensor `name`, in its stored dtype; all of it by default."""
        shape = self.shape(name)
        stop = (shape[0] if shape else 1) if stop is None else stop
        out = torch.empty([stop - start, *shape[1:]] if shape else [], dtype=self.dtype(name))
        return self.read_into(name, out, start)

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Fill `out` (contiguous, on CPU, of the stored dtype and row shape) with the rows of
        tensor `name` from `start` on: no other buffer is allocated."""
        entry = self._entry(name)
        shape, dtype = list(entry["shape"]), _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        rows = shape[0] if shape else 1
        count = out.shape[0] if shape else 1
        if out.dtype != dtype or list(out.shape[1:] if shape else out.shape) != shape[1:] \
                or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"{self.path}: cannot read {name} ({entry['dtype']} {shape}) into a "
                             f"{out.dtype} {tuple(out.shape)} tensor on {out.device}")
        if not 0 <= start <= start + count <= rows:
            raise IndexError(f"{self.path}: rows {start}:{start + count} of {name}, which has {rows}")
        row_bytes = (end - begin) // max(rows, 1)
        if out.numel():
            buffer = out.reshape(-1).view(torch.uint8)
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin + start * row_bytes)
                got = f.readinto(buffer.numpy())
            if got != buffer.numel():
                raise ValueError(f"{self.path}: {name} is cut off (read {got} of {buffer.numel()} bytes)")
        return out
