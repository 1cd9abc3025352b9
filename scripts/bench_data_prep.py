"""Benchmark data_prep: MB/s and tokens/s, total and per worker, to size a cluster job.

    python scripts/bench_data_prep.py --tokenizer tokenizer.model [--workers 1 2 4] [--mb 8]
                                      [--slimpajama ROOT] [--starcoder ROOT] [--json results.json]
    python scripts/bench_data_prep.py --tokenizer HF_DIR/tokenizer.json ...   (or HF_DIR)

Runs the real pipeline (read + decompress/parse + tokenize + write shards) end to end.
Without --slimpajama/--starcoder it writes a corpus of --mb MB per source into a temporary
directory, in the real formats, from text this Python ships with: prose from the pydoc
topic texts and docstrings (SlimPajama-like .jsonl.zst) and code from the standard
library's .py files (StarCoder-like parquet). Nothing is downloaded. MB are UTF-8 bytes
of document text; the per-worker figures are the totals divided by --workers. The
"encode only" rows time the tokenizer alone (sentencepiece, or `tokenizers` for a
tokenizer.json) in this process, one thread, as a worker runs it: the ceiling of one worker. End-to-end rows include starting the worker processes (~1 s), so use a corpus
large enough (--mb) that this does not matter.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import zstandard  # noqa: E402

from data_prep.pipeline import Job, run  # noqa: E402

_FILE_MB = 1.0  # document text per generated input file: several files per worker


def _stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))


def _prose_documents(megabytes: float) -> list[str]:
    """Natural-language text: pydoc topics (the language reference), then module docstrings
    until there is `megabytes` of distinct text (or the standard library runs out)."""
    docs = []
    try:
        from pydoc_data.topics import topics
        docs += [topics[k] for k in sorted(topics)]
    except ImportError:
        pass
    size = sum(len(d) for d in docs)
    for path in _stdlib_files():
        if size >= megabytes * 1e6:
            break
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # test fixtures in the stdlib that are broken on purpose
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) > 200:
                    docs.append(text)
                    size += len(text)
    return docs


def _code_documents(megabytes: float) -> list[str]:
    docs, size = [], 0
    for path in _stdlib_files():
        if size >= megabytes * 1e6:
            break
        try:
            docs.append(path.read_text(encoding="utf-8"))
            size += len(docs[-1])
        except UnicodeDecodeError:
            continue
    return docs


def _take(docs: list[str], megabytes: float) -> list[list[str]]:
    """Cycle through `docs` until `megabytes` of text; group into ~_FILE_MB files."""
    if not docs:
        raise SystemExit("error: found no text to build a benchmark corpus from; pass --slimpajama/--starcoder")
    files, current, size, total, i = [], [], 0, 0, 0
    while total < megabytes * 1e6:
        doc = docs[i % len(docs)]
        i += 1
        current.append(doc)
        n = len(doc.encode("utf-8"))
        size += n
        total += n
        if size >= _FILE_MB * 1e6:
            files.append(current)
            current, size = [], 0
    if current:
        files.append(current)
    return files


def write_corpus(root: Path, megabytes: float) -> tuple[Path, Path]:
    sp_root, sc_root = root / "slimpajama", root / "starcoder"
    for i, docs in enumerate(_take(_prose_documents(megabytes), megabytes)):
        path = sp_root / "train" / "chunk1" / f"example_train_{i}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"text": d, "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}) + "\n"
                        for d in docs)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines.encode("utf-8")))
    for i, docs in enumerate(_take(_code_documents(megabytes), megabytes)):
        path = sc_root / "python" / f"train-{i:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"content": docs}), path)
    return sp_root, sc_root


def bench_encode_only(source: str, root: Path, tokenizer: Path, megabytes: float) -> dict:
    """The tokenizer alone, one process, one thread (as in a worker): the ceiling of one worker."""
    import os

    from data_prep.errors import BadInputReport
    from data_prep.pipeline import FINDERS
    from data_prep.tokenize_file import READERS, load_document_tokenizer

    texts, size = [], 0
    for path in FINDERS[source](root, "train" if source == "slimpajama" else None):
        for _, text in READERS[source](path, BadInputReport(str(path), skip_bad=True)):
            texts.append(text)
            size += len(text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as init_worker sets it
    encoder = load_document_tokenizer(tokenizer)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 256):
        tokens += sum(map(len, encoder.encode_documents(texts[i:i + 256])))
    seconds = time.perf_counter() - start
    return {"source": f"{source} (encode only)", "workers": 1, "files": "-", "documents": len(texts),
            "MB": round(size / 1e6, 2), "tokens": tokens, "seconds": round(seconds, 2),
            "MB/s": round(size / 1e6 / seconds, 2), "tokens/s": round(tokens / seconds),
            "MB/s/worker": round(size / 1e6 / seconds, 2), "tokens/s/worker": round(tokens / seconds),
            "bytes/token": round(size / max(tokens, 1), 2)}


def bench(source: str, root: Path, tokenizer: Path, workers: int, scratch: Path) -> dict:
    out = scratch / f"out_{source}_{workers}"
    start = time.perf_counter()
    summary = run(Job(source=source, input_root=root, output=out, tokenizer=tokenizer,
                      split="train" if source == "slimpajama" else None, workers=workers, progress=False))
    seconds = time.perf_counter() - start
    mb, tokens = summary["text_bytes"] / 1e6, summary["tokens"]
    return {"source": source, "workers": workers, "files": summary["files"], "documents": summary["documents"],
            "MB": round(mb, 2), "tokens": tokens, "seconds": round(seconds, 2),
            "MB/s": round(mb / seconds, 2), "tokens/s": round(tokens / seconds),
            "MB/s/worker": round(mb / seconds / workers, 2), "tokens/s/worker": round(tokens / seconds / workers),
            "bytes/token": round(summary["text_bytes"] / max(tokens, 1), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path, help="a sentencepiece .model, an HF tokenizer.json, "
                   "or a directory holding one")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mb", type=float, default=8.0, help="MB of text per source for the generated corpus")
    p.add_argument("--slimpajama", type=Path, help="benchmark on this SlimPajama root (train split) instead")
    p.add_argument("--starcoder", type=Path, help="benchmark on this StarCoder root instead")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    from data_prep.errors import DataPrepError
    from data_prep.tokenize_file import load_document_tokenizer

    try:
        kind = load_document_tokenizer(args.tokenizer).tokenizer.kind
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        scratch = Path(tmp)
        if args.slimpajama or args.starcoder:
            sources = [(s, r) for s, r in (("slimpajama", args.slimpajama), ("starcoder", args.starcoder)) if r]
        else:
            print(f"writing a {args.mb:g} MB-per-source corpus from the standard library to {scratch} ...",
                  file=sys.stderr)
            sp_root, sc_root = write_corpus(scratch / "corpus", args.mb)
            sources = [("slimpajama", sp_root), ("starcoder", sc_root)]
        rows = []
        for source, root in sources:
            rows.append(bench_encode_only(source, root, args.tokenizer, args.mb))
            rows += [bench(source, root, args.tokenizer, w, scratch) for w in args.workers]

    columns = ["source", "workers", "files", "MB", "tokens", "seconds", "MB/s", "tokens/s", "MB/s/worker",
               "tokens/s/worker", "bytes/token"]
    def cell(value) -> str:
        return f"{value:,}" if isinstance(value, int) else str(value)

    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    print(f"tokenizer: {args.tokenizer} ({kind})")
    print(" | ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(cell(r[c]).rjust(w) for c, w in zip(columns, widths)))
    if args.json:
        args.json.write_text(json.dumps({"tokenizer": str(args.tokenizer), "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
