"""Atomic file writes, the one helper every package of the repository uses.

A reader (or a re-run after a crash) sees the whole file or none of it: each file is
written under a hidden temporary name beside its target (".NAME.tmp-PID"), flushed to disk
and renamed into place; a failed write leaves no temporary behind. It lives in model/
because every other package already depends on model/.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden name a file is written under before it is renamed to `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success fsync it and rename it to `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path, obj, **dump_kwargs) -> None:
    dump_kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def write_jsonl(path, rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_torch(path, obj) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
