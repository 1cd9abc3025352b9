"""Tokenizes one input file into a flat token file: the unit of parallel work.

Runs in a worker process of the pool (or anywhere: it is a plain function). For input
number `index` it writes, inside the run's work directory,

    input_{index:06d}.tok   the documents' tokens, each followed by EOS, raw little-endian
                            ids in the shard dtype (no header);
    input_{index:06d}.json  its counts: documents, tokens, text bytes, skipped by reason.

Both are written under a temporary name and renamed when complete, the .json last: the
.json existing is what "this input is tokenized" means to a resumed run.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np

from data_prep import slimpajama, starcoder
from data_prep.errors import INVALID_UTF8, BadInputReport
from model.atomic import atomic_path, write_json

READERS = {"slimpajama": slimpajama.read_documents, "starcoder": starcoder.read_documents}
# Documents are encoded in batches (sentencepiece's batch call is much faster than one
# call per document); a batch is flushed at this many documents or UTF-8 bytes.
_BATCH_DOCS = 256
_BATCH_BYTES = 1 << 20  # also bounds how long a worker takes to notice an abort

_worker: dict = {}  # per-process state set by init_worker: the processor, the eos id, counters


def init_worker(tokenizer, counters=None, watch_parent: bool = False) -> None:
    """Pool initializer: build the sentencepiece processor once per process."""
    _worker["processor"] = tokenizer.processor()
    _worker["tokenizer"] = tokenizer
    _worker["counters"] = counters
    if watch_parent:
        _exit_when_orphaned()


def _exit_when_orphaned() -> None:
    """A killed parent (kill -9) cannot stop its pool: leave instead of idling forever."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def token_path(work_dir: Path, index: int) -> Path:
    return Path(work_dir) / f"input_{index:06d}.tok"


def stats_path(work_dir: Path, index: int) -> Path:
    return Path(work_dir) / f"input_{index:06d}.json"


def tokenize_file(source: str, index: int, path: str, display: str, work_dir: str, skip_bad: bool) -> dict:
    """Tokenize input `path` (shown as `display` in messages); return its counts."""
    processor, tokenizer = _worker["processor"], _worker["tokenizer"]
    report = BadInputReport(display, skip_bad)
    out_path = token_path(Path(work_dir), index)
    docs = tokens = text_bytes = 0
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as out:
            texts: list[str] = []
            batch_bytes = 0

            def flush() -> None:
                nonlocal docs, tokens, text_bytes, batch_bytes
                ids = processor.encode(texts, out_type=int, add_bos=False, add_eos=True, num_threads=1)
                n = sum(map(len, ids))
                array = np.fromiter(itertools.chain.from_iterable(ids), dtype=tokenizer.dtype, count=n)
                out.write(array.tobytes())
                docs, tokens, text_bytes = docs + len(texts), tokens + n, text_bytes + batch_bytes
                _count_progress(batch_bytes, len(texts), n)
                texts.clear()
                batch_bytes = 0

            for location, text in READERS[source](Path(path), report):
                if not text or text.isspace():
                    report.empty(location)
                    continue
                try:  # lone surrogates (from JSON \udXXX escapes) have no UTF-8 form
                    size = len(text.encode("utf-8"))
                except UnicodeEncodeError as e:
                    report.bad(location, INVALID_UTF8, f"character {e.start} is a lone surrogate, not text")
                    continue
                texts.append(text)
                batch_bytes += size
                if len(texts) >= _BATCH_DOCS or batch_bytes >= _BATCH_BYTES:
                    flush()
            if texts:
                flush()
    stats = {"index": index, "input": display, "size": os.path.getsize(path), "documents": docs,
             "tokens": tokens, "text_bytes": text_bytes, "skipped": dict(report.skipped),
             "excluded": dict(report.excluded), "skipped_examples": report.examples}
    write_json_atomic(stats_path(Path(work_dir), index), stats)
    return stats


class Aborted(Exception):
    """The parent stopped the run (another input failed, or Ctrl-C)."""


def _count_progress(nbytes: int, ndocs: int, ntokens: int) -> None:
    counters = _worker.get("counters")
    if counters is None:
        return
    with counters.get_lock():  # shared with the parent's progress bar
        counters[0] += nbytes
        counters[1] += ndocs
        counters[2] += ntokens
        abort = counters[3]
    if abort:
        raise Aborted("stopped by the parent process")


def write_json_atomic(path: Path, obj) -> None:
    """data_prep's JSON files (stats, run state, summary): sorted keys, written atomically."""
    write_json(path, obj, indent=1, sort_keys=True)
