"""The persistent state of one tokenization run: what makes it resumable and idempotent.

Output directory OUT during a run:

    OUT/.work/lock                 held (flock) by the running process: one run per OUT
    OUT/.work/manifest.json        settings, inputs, progress; rewritten atomically after
                                   every shard is committed
    OUT/.work/<prefix>_NNNNNN.bin  committed shards, not yet visible to readers
    OUT/.work/input_NNNNNN.tok/.json   tokenized inputs waiting to be cut into shards

and when it is complete: OUT/<prefix>_NNNNNN.bin + OUT/summary.json, no .work/.

The manifest records the position in the concatenated token stream where the committed
shards end (input index + token offset in it), with the counts of the inputs before it.
A resumed run continues from exactly there, so it writes the same bytes a clean run would.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from data_prep.errors import EMPTY, DataPrepError
from data_prep.tokenize_file import write_json_atomic

SUMMARY_NAME = "summary.json"
WORK_DIR_NAME = ".work"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

try:
    import fcntl
except ImportError:  # not POSIX: runs still work, concurrent runs on one OUT are not detected
    fcntl = None


def inputs_digest(inputs: list[list]) -> str:
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def new_totals() -> dict:
    return {"files": 0, "documents": 0, "tokens": 0, "text_bytes": 0, "skipped": {}, "excluded": {},
            "skipped_examples": []}


def add_input_stats(totals: dict, stats: dict, max_examples: int = 100) -> None:
    totals["files"] += 1
    for key in ("documents", "tokens", "text_bytes"):
        totals[key] += stats[key]
    for key in ("skipped", "excluded"):
        for reason, count in stats[key].items():
            totals[key][reason] = totals[key].get(reason, 0) + count
    room = max_examples - len(totals["skipped_examples"])
    totals["skipped_examples"].extend(stats["skipped_examples"][:max(room, 0)])


def has_bad_skips(skipped: dict) -> bool:
    """True when documents were dropped for a reason only --skip-bad allows."""
    return any(count for reason, count in skipped.items() if reason != EMPTY)


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable before recording them as done."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(work: Path):
    """Fail fast if another process is already running on this output directory."""
    with open(work / "lock", "w") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataPrepError(f"another data_prep run holds {work / 'lock'}; wait for it to finish "
                                    f"(two runs must not write the same --output)") from None
        yield


def load_or_start(work: Path, settings: dict, inputs: list[list], skip_bad: bool) -> dict:
    """The manifest of an interrupted run (checked against this run) or a fresh one."""
    path = work / MANIFEST_NAME
    start_over = f"delete {work} to start this output over"
    if not path.exists():
        state = {"version": MANIFEST_VERSION, "settings": settings, "inputs": inputs, "phase": "tokenizing",
                 "next_input": 0, "next_offset": 0, "shards": [], "totals": new_totals()}
        write_json_atomic(path, state)
        return state
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataPrepError(f"{path} is not valid JSON ({e}); {start_over}") from e
    if state.get("version") != MANIFEST_VERSION:
        raise DataPrepError(f"{path} has manifest version {state.get('version')}, this code writes "
                            f"{MANIFEST_VERSION}; {start_over}")
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise DataPrepError(f"{path}: an interrupted run used different settings ({diff}); re-run with "
                            f"the same settings to resume it, or {start_over}")
    old_names = [name for name, _ in state["inputs"]]
    if old_names != [name for name, _ in inputs]:
        raise DataPrepError(f"{path}: the set of input files changed since the interrupted run "
                            f"({len(old_names)} then, {len(inputs)} now); the shard order depends on it, "
                            f"so {start_over}")
    for index in range(state["next_input"] + (state["next_offset"] > 0)):
        if state["inputs"][index] != inputs[index]:
            raise DataPrepError(f"input {inputs[index][0]} changed size ({state['inputs'][index][1]} -> "
                                f"{inputs[index][1]} bytes) after its tokens were written to shards; {start_over}")
    state["inputs"] = inputs  # later inputs may have changed (e.g. a bad file fixed): they are redone
    if not skip_bad and has_bad_skips(state["totals"]["skipped"]):
        raise DataPrepError(f"{path}: the interrupted run skipped bad documents "
                            f"({state['totals']['skipped']}); resume it with --skip-bad, or {start_over}")
    return state


def save(work: Path, state: dict) -> None:
    write_json_atomic(work / MANIFEST_NAME, state)
