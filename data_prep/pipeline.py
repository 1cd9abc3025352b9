"""Runs one tokenization job: input files -> token shards + summary.json in OUT.

Two levels, so that the output is the same bytes for any --workers and any number of
interruptions:
1. A process pool tokenizes input files in parallel, each into its own token file in
   OUT/.work (tokenize_file.py). At most a few inputs per worker run ahead of step 2, so
   the temporary disk space stays bounded.
2. This process takes the token files strictly in input order and cuts the concatenated
   stream into shards of exactly --shard-tokens tokens (the last one shorter), committed
   one by one into OUT/.work with the manifest recording where each ends (run_state.py).
When every input is in, the shards are moved into OUT and summary.json is written last:
readers never see shards of an unfinished run.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import run_state, shards, slimpajama, starcoder
from data_prep.errors import DataPrepError
from data_prep.run_state import SUMMARY_NAME, WORK_DIR_NAME
from data_prep.tokenize_file import (DocumentTokenizer, init_worker, load_document_tokenizer, stats_path,
                                     token_path, tokenize_file, write_json_atomic)

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB uint16 shards: ~10k files for TinyLlama's 950B tokens
FINDERS = {"slimpajama": slimpajama.find_inputs, "starcoder": starcoder.find_inputs}
_AHEAD_PER_WORKER = 3  # inputs tokenized ahead of the shard writer, per worker
# Test hook: "input:N", "shard:N" or "published:N" SIGKILLs this process after consuming N
# inputs / committing N shards / publishing N shards, to test that an interrupted run
# resumes to the same output. Never set outside tests.
_KILL_ENV = "DATA_PREP_TEST_KILL_AFTER"


@dataclass
class Job:
    source: str                # "slimpajama" | "starcoder"
    input_root: Path
    output: Path
    tokenizer: Path
    split: str | None = None   # SlimPajama split; None for StarCoder
    workers: int = 1
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    skip_bad: bool = False
    dtype: str = "auto"
    progress: bool = True
    eos_token: str | None = None  # the token that ends each document; None: the tokenizer's EOS

    @property
    def prefix(self) -> str:
        return self.source if self.split is None else f"{self.source}_{self.split}"


def run(job: Job) -> dict:
    """Run (or resume, or confirm) the job; return the summary that is in OUT/summary.json."""
    started = time.monotonic()
    if job.workers < 1:
        raise DataPrepError(f"--workers must be at least 1, got {job.workers}")
    if job.shard_tokens < 1:
        raise DataPrepError(f"--shard-tokens must be at least 1, got {job.shard_tokens}")
    tokenizer = load_document_tokenizer(job.tokenizer, job.dtype, job.eos_token)
    root, out = Path(job.input_root), Path(job.output)
    files = FINDERS[job.source](root, job.split)
    inputs = [[f.relative_to(root).as_posix(), f.stat().st_size] for f in files]
    settings = {"format_version": shards.VERSION, "source": job.source, "split": job.split,
                "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id, "dtype": tokenizer.dtype.name, "shard_tokens": job.shard_tokens}

    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / SUMMARY_NAME
    if summary_file.exists():
        return _confirm_done(summary_file, settings, inputs)
    work = out / WORK_DIR_NAME
    work.mkdir(exist_ok=True)
    with run_state.exclusive_lock(work):
        resumed = (work / run_state.MANIFEST_NAME).exists()  # an interrupted run left its state
        state = run_state.load_or_start(work, settings, inputs, job.skip_bad)
        stray = [p.name for p in shards.list_shards(out)]
        expected = {s["name"] for s in state["shards"]} if state["phase"] == "publishing" else set()
        if set(stray) - expected:
            raise DataPrepError(f"{out} already holds shards that are not from this run "
                                f"({', '.join(sorted(set(stray) - expected)[:3])}...); choose an empty --output")
        _remove_leftovers(work, state)
        if state["phase"] == "tokenizing":
            _tokenize_and_pack(job, tokenizer, files, work, state)
        _publish(out, work, state)
        summary = _summary(job, tokenizer, state, settings, inputs, resumed, time.monotonic() - started)
        write_json_atomic(summary_file, summary)  # last: its presence means "complete"
    shutil.rmtree(work)
    return summary


def _confirm_done(summary_file: Path, settings: dict, inputs: list[list]) -> dict:
    """A re-run of a finished job changes nothing; a different job must not reuse OUT."""
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    if summary.get("settings") != settings or summary.get("inputs_sha256") != run_state.inputs_digest(inputs):
        raise DataPrepError(f"{summary_file.parent} already holds a finished run with other inputs or "
                            f"settings; choose another --output or delete that directory")
    work = summary_file.parent / WORK_DIR_NAME
    if work.exists():  # the previous run ended between writing the summary and this cleanup
        shutil.rmtree(work)
    summary["already_complete"] = True
    return summary


def _remove_leftovers(work: Path, state: dict) -> None:
    """Temporaries of a killed run, and token files of inputs already in committed shards."""
    for path in work.iterdir():
        if path.name.startswith("."):  # our temporaries are all dot-files (".name.tmp-PID")
            path.unlink()
    for index in range(state["next_input"]):
        token_path(work, index).unlink(missing_ok=True)
        stats_path(work, index).unlink(missing_ok=True)


def _tokenize_and_pack(job: Job, tokenizer: DocumentTokenizer, files: list[Path], work: Path, state: dict) -> None:
    first = state["next_input"]
    packer = ShardPacker(work, job.prefix, job.shard_tokens, tokenizer, state)
    context = multiprocessing.get_context("spawn")  # safe with threads, same on every OS
    counters = context.Array("q", 4)  # text bytes, documents, tokens (this run); [3] = abort flag
    bar = tqdm(total=len(files), initial=first, unit="file", desc=job.prefix, disable=not job.progress,
               dynamic_ncols=True, mininterval=0.5)
    progress = _Progress(bar, counters)
    pool = ProcessPoolExecutor(max_workers=job.workers, mp_context=context, initializer=init_worker,
                               initargs=(tokenizer, counters, True))
    pending: dict[int, Future] = {}
    submitted = first
    try:
        for index in range(first, len(files)):
            while submitted < min(len(files), index + _AHEAD_PER_WORKER * job.workers):
                if _cached_stats(work, submitted, state, tokenizer, job.skip_bad) is None:
                    pending[submitted] = pool.submit(tokenize_file, job.source, submitted, str(files[submitted]),
                                                     str(files[submitted]), str(work), job.skip_bad)
                submitted += 1
            if index in pending:
                stats = progress.wait(pending.pop(index))
            else:
                stats = _cached_stats(work, index, state, tokenizer, job.skip_bad)
            packer.add_input(index, stats, state["next_offset"] if index == first else 0)
            bar.update(1)
            progress.refresh()
            _maybe_kill("input", index + 1 - first)
        packer.finish()
    except BaseException:
        counters[3] = 1  # workers notice between batches and stop; no need to wait out whole files
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    pool.shutdown(wait=True)
    progress.refresh(force=True)
    bar.close()


def _cached_stats(work: Path, index: int, state: dict, tokenizer: DocumentTokenizer, skip_bad: bool) -> dict | None:
    """Counts of an input tokenized by an earlier (interrupted) run, if still valid."""
    path = stats_path(work, index)
    if not path.exists():
        return None
    stats = json.loads(path.read_text(encoding="utf-8"))
    tokens_file = token_path(work, index)
    valid = (stats.get("size") == state["inputs"][index][1]
             and tokens_file.exists()
             and tokens_file.stat().st_size == stats["tokens"] * tokenizer.dtype.itemsize
             and (skip_bad or not run_state.has_bad_skips(stats["skipped"])))
    if not valid:  # input changed, or the policy differs: tokenize it again
        path.unlink()
        tokens_file.unlink(missing_ok=True)
        return None
    return stats


class ShardPacker:
    """Cuts the token stream of the inputs, taken in order, into shards of `shard_tokens`."""

    def __init__(self, work: Path, prefix: str, shard_tokens: int, tokenizer: DocumentTokenizer, state: dict):
        self.work, self.prefix, self.tokenizer, self.state = work, prefix, tokenizer, state
        self.buffer = np.empty(shard_tokens, dtype=tokenizer.dtype)  # pages are touched only as filled
        self.filled = 0
        self.consumed: list[int] = []  # inputs whose token files can go once a shard commits

    def add_input(self, index: int, stats: dict, offset: int) -> None:
        total = stats["tokens"]
        tokens = (np.memmap(token_path(self.work, index), dtype=self.tokenizer.dtype, mode="r")
                  if total else np.zeros(0, self.tokenizer.dtype))
        position = offset
        while True:
            take = min(total - position, len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[position:position + take]
            self.filled += take
            position += take
            if position == total:  # the input is in: its counts join the totals
                run_state.add_input_stats(self.state["totals"], stats)
                self.state["next_input"], self.state["next_offset"] = index + 1, 0
                self.consumed.append(index)
            else:
                self.state["next_input"], self.state["next_offset"] = index, position
            if self.filled == len(self.buffer):
                self._commit()
            if position == total:
                break
        del tokens  # close the memory map before the file may be deleted

    def finish(self) -> None:
        if self.filled:
            self._commit()
        self.state["phase"] = "publishing"
        run_state.save(self.work, self.state)

    def _commit(self) -> None:
        tok = self.tokenizer
        name = f"{self.prefix}_{len(self.state['shards']):06d}{shards.SHARD_SUFFIX}"
        chunk = self.buffer[:self.filled]
        documents = int(np.count_nonzero(chunk == tok.eos_id))  # EOS only ends documents
        shards.write_shard(self.work / name, chunk, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                           num_docs=documents, dtype=tok.dtype)
        run_state.fsync_dir(self.work)
        self.state["shards"].append({"name": name, "tokens": self.filled, "documents": documents})
        run_state.save(self.work, self.state)
        for index in self.consumed:
            token_path(self.work, index).unlink(missing_ok=True)
            stats_path(self.work, index).unlink(missing_ok=True)
        self.consumed.clear()
        self.filled = 0
        _maybe_kill("shard", len(self.state["shards"]))


def _publish(out: Path, work: Path, state: dict) -> None:
    """Move the committed shards into OUT (idempotent: a crash here is resumed here)."""
    for number, shard in enumerate(state["shards"], start=1):
        source, target = work / shard["name"], out / shard["name"]
        if source.exists():
            os.replace(source, target)
        elif not target.exists():
            raise DataPrepError(f"shard {shard['name']} is in neither {work} nor {out}; "
                                f"delete {out} and run again")
        _maybe_kill("published", number)
    run_state.fsync_dir(out)


def _summary(job: Job, tokenizer: DocumentTokenizer, state: dict, settings: dict, inputs: list[list],
             resumed: bool, seconds: float) -> dict:
    totals = state["totals"]
    return {
        "format_version": shards.VERSION,
        "source": job.source, "split": job.split, "input": str(Path(job.input_root).resolve()),
        "tokenizer": tokenizer.describe(), "dtype": tokenizer.dtype.name, "shard_tokens": job.shard_tokens,
        "files": totals["files"], "documents": totals["documents"], "tokens": totals["tokens"],
        "text_bytes": totals["text_bytes"],
        "skipped_documents": dict(sorted(totals["skipped"].items())),
        "excluded_documents": dict(sorted(totals["excluded"].items())),
        "skipped_examples": totals["skipped_examples"],
        "shards": state["shards"],
        "settings": settings, "inputs_sha256": run_state.inputs_digest(inputs),
        "workers": job.workers, "resumed": resumed, "seconds": round(seconds, 3),
    }


class _Progress:
    """Feeds the bar from counters the workers update after every batch of documents."""

    def __init__(self, bar: tqdm, counters):
        self.bar, self.counters = bar, counters
        self.start = self.last = time.monotonic()

    def wait(self, future: Future) -> dict:
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                self.refresh()

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        nbytes, docs, tokens, _ = self.counters[:]
        elapsed = max(now - self.start, 1e-9)
        self.bar.set_postfix_str(f"docs={docs:,} {nbytes / elapsed / 1e6:.2f}MB/s "
                                 f"{tokens / elapsed:,.0f}tok/s")


def _maybe_kill(event: str, count: int) -> None:
    if os.environ.get(_KILL_ENV) == f"{event}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
