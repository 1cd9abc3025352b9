"""Tokenizes one input file into a flat token file: the unit of parallel work.

Runs in a worker process of the pool (or anywhere: it is a plain function). For input
number `index` it writes, inside the run's work directory,

    input_{index:06d}.tok   the documents' tokens, each followed by EOS, raw little-endian
                            ids in the shard dtype (no header);
    input_{index:06d}.json  its counts: documents, tokens, text bytes, skipped by reason.

Both are written under a temporary name and renamed when complete, the .json last: the
.json existing is what "this input is tokenized" means to a resumed run.

`DocumentTokenizer` is the tokenizer (data_prep/tokenizer.py, either backend) as data_prep
uses it: each document's ids followed by the separator, which is the tokenizer's EOS unless
--eos-token names another token (a chat tokenizer's eos_token is its end-of-turn, e.g.
SmolLM2-Instruct's <|im_end|>; its pretraining separated documents with <|endoftext|>). The
separator's id is what the shard headers record as eos_id, which --document-mask reads.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import slimpajama, starcoder
from data_prep.errors import INVALID_UTF8, BadInputReport, DataPrepError
from data_prep.shards import dtype_for_vocab
from data_prep.tokenizer import Tokenizer, load_tokenizer
from model.atomic import atomic_path, write_json

READERS = {"slimpajama": slimpajama.read_documents, "starcoder": starcoder.read_documents}
DTYPE_CHOICES = ("auto", "uint16", "uint32")
# Documents are encoded in batches (sentencepiece's and tokenizers' batch calls are much faster
# than one call per document); a batch is flushed at this many documents or UTF-8 bytes.
_BATCH_DOCS = 256
_BATCH_BYTES = 1 << 20  # also bounds how long a worker takes to notice an abort

_worker: dict = {}  # per-process state set by init_worker: the tokenizer, counters


@dataclass
class DocumentTokenizer:
    tokenizer: Tokenizer
    eos_id: int        # ends every document (the tokenizer's EOS, or --eos-token): the headers' eos_id
    dtype: np.dtype    # of the token ids in the shards

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def sha256(self) -> str:
        return self.tokenizer.sha256

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer.encode_batch(texts)
        for row in ids:
            row.append(self.eos_id)
        return ids

    def describe(self) -> dict:
        return self.tokenizer.describe() | {"eos_id": self.eos_id,
                                            "eos_token": self.tokenizer.id_to_token(self.eos_id)}


def load_document_tokenizer(path: str | os.PathLike, dtype: str = "auto",
                            eos_token: str | None = None) -> DocumentTokenizer:
    """Read and check --tokenizer; `dtype` is "auto" (smallest that fits) or forced, `eos_token`
    the document separator when it is not the tokenizer's eos_token (--eos-token)."""
    try:
        tokenizer = load_tokenizer(override=path, eos_token=eos_token)
    except FileNotFoundError as e:
        raise DataPrepError(f"{e}; train a sentencepiece one with data_prep/train_tokenizer.py") from e
    except ValueError as e:
        raise DataPrepError(str(e)) from e
    if dtype not in DTYPE_CHOICES:
        raise DataPrepError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    vocab_size = tokenizer.vocab_size
    token_dtype = dtype_for_vocab(vocab_size) if dtype == "auto" else np.dtype(dtype).newbyteorder("<")
    if vocab_size - 1 > np.iinfo(token_dtype).max:
        raise DataPrepError(f"{tokenizer.path} has {vocab_size} pieces: ids up to {vocab_size - 1} do not fit "
                            f"--dtype {dtype} (max {np.iinfo(token_dtype).max}); use --dtype uint32 or auto")
    return DocumentTokenizer(tokenizer, tokenizer.eos_id, token_dtype)


def init_worker(tokenizer: DocumentTokenizer, counters=None, watch_parent: bool = False) -> None:
    """Pool initializer: build the tokenizer's backend once per process."""
    # One thread per worker: the pool is the parallelism (and `tokenizers` would otherwise
    # start a thread per core in every worker).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer.tokenizer.backend  # noqa: B018  (builds it)
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
    tokenizer = _worker["tokenizer"]
    report = BadInputReport(display, skip_bad)
    out_path = token_path(Path(work_dir), index)
    docs = tokens = text_bytes = 0
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as out:
            texts: list[str] = []
            batch_bytes = 0

            def flush() -> None:
                nonlocal docs, tokens, text_bytes, batch_bytes
                ids = tokenizer.encode_documents(texts)
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
