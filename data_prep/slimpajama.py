"""SlimPajama reader: finds a split's `.jsonl.zst` files and yields their documents.

Layout (as published): ROOT/{train,validation,test}/chunk*/*.jsonl.zst, one JSON object
per line: {"text": str, "meta": {"redpajama_set_name": "RedPajamaC4" | ...}}.
TinyLlama left out the RedPajamaGithub set because StarCoder covers code; so do we.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import zstandard

from data_prep.errors import (CORRUPT_ZST, MALFORMED_JSON, MISSING_TEXT, TRUNCATED_ZST, INVALID_UTF8,
                              BadInputReport, DataPrepError)

SPLITS = ("train", "validation", "test")
EXCLUDED_SETS = frozenset({"RedPajamaGithub"})
_READ_SIZE = 1 << 20  # compressed bytes read at a time: memory stays bounded for any file size


def find_inputs(root: str | Path, split: str) -> list[Path]:
    """The split's files, sorted by their path under ROOT (the order of the output)."""
    root = Path(root)
    if split not in SPLITS:
        raise DataPrepError(f"unknown SlimPajama split {split!r}; choose one of {', '.join(SPLITS)}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataPrepError(f"{split_dir} is not a directory: --input must be the SlimPajama root "
                            f"that holds {'/, '.join(SPLITS)}/")
    files = sorted(split_dir.glob("chunk*/*.jsonl.zst"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataPrepError(f"no files match {split_dir}/chunk*/*.jsonl.zst")
    return files


def read_documents(path: Path, report: BadInputReport) -> Iterator[tuple[str, str]]:
    """Yield (location, text) for each kept document; bad lines go to `report`."""
    for line_no, raw in enumerate(_zst_lines(path, report), start=1):
        location = f"line {line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.bad(location, INVALID_UTF8, f"byte {e.start} of the line is not UTF-8 ({e.reason})")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.bad(location, MALFORMED_JSON, f"{e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            report.bad(location, MALFORMED_JSON, f"expected a JSON object, got {type(obj).__name__}")
            continue
        text = obj.get("text")
        if not isinstance(text, str):
            got = "no 'text' field" if text is None else f"'text' is a {type(text).__name__}"
            report.bad(location, MISSING_TEXT, f"{got}; expected a string")
            continue
        meta = obj.get("meta")
        set_name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        if set_name in EXCLUDED_SETS:
            report.exclude(set_name)
            continue
        yield location, text


def _zst_lines(path: Path, report: BadInputReport) -> Iterator[bytes]:
    """Decompress `path` incrementally and yield its lines (without the newline).

    zstandard's stream_reader stops silently at a truncated frame, so frames are decoded
    with decompressobj and the end of the file must coincide with the end of a frame.
    A line cut by the truncation is never yielded: only complete lines are data.
    """
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    frame_has_input = False
    frames_done = 0
    pending = b""  # an unfinished line carried between decompressed chunks
    produced = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_SIZE):
            while chunk:
                try:
                    data = frame.decompress(chunk)
                except zstandard.ZstdError as e:
                    report.bad(None, CORRUPT_ZST, f"zstd cannot decode the file after {produced} "
                                                  f"decompressed bytes ({e})")
                    return
                frame_has_input = True
                produced += len(data)
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                yield from lines
                if frame.eof:  # a file may hold several frames back to back
                    chunk = frame.unused_data
                    frames_done += 1
                    frame = decompressor.decompressobj()
                    frame_has_input = False
                else:
                    chunk = b""
    if frame_has_input or frames_done == 0:
        cut = f"; its last line ({len(pending)} bytes) is incomplete" if pending else ""
        report.bad(None, TRUNCATED_ZST, f"the zstd stream ends in the middle of a frame after "
                                        f"{produced} decompressed bytes{cut}: the file is truncated")
        return
    if pending:
        yield pending  # the last line had no trailing newline
