"""Build a small, real training corpus from the running Python's standard library.

    python scripts/make_local_corpus.py --out DIR [--max-mb 20] [--val-fraction 0.05]
                                        [--seed 0] [--chat-pairs 3000]

Nothing is downloaded: the text is the standard library of this interpreter
(``sysconfig.get_paths()["stdlib"]``: its docstrings, its source files and the pydoc
topic texts of ``pydoc_data``), written in the on-disk formats of the real data sets,
so the quickstart runs the same data_prep/pretrain/finetune code paths as a full run.

Output layout (every path below DIR is replaced as a whole on each run):

    DIR/slimpajama/train/chunk{1,2}/example_train_{i}.jsonl.zst      SlimPajama layout
    DIR/slimpajama/validation/chunk1/example_holdout_{i}.jsonl.zst
        one JSON object per line: {"text": str, "meta": {"redpajama_set_name": str}}
        set names: RedPajamaWikipedia (one article per module: its docstrings),
                   RedPajamaBook (the pydoc language-reference topics),
                   RedPajamaGithub (a few raw source files: SlimPajama-based pipelines
                   drop this set, so data_prep's filter has something to drop)
        As in SlimPajama, file names repeat across chunk directories.
    DIR/starcoder/train/python/train-{i:05d}-of-{n:05d}.parquet          StarCoder layout
    DIR/starcoder/validation/python/validation-{i:05d}-of-{n:05d}.parquet
        columns: content (the source file), max_stars_repo_path ("Lib/json/decoder.py"),
                 max_stars_repo_name ("python/cpython"). Train and validation are separate
                 roots: pass DIR/starcoder/train or DIR/starcoder/validation as --input.
    DIR/chat/train.jsonl, DIR/chat/test.jsonl                          UltraChat-200k layout
        {"prompt": q, "prompt_id": sha256(q), "messages": [{"role": "user", "content": q},
         {"role": "assistant", "content": a}]}; q asks about a public function or class
         ("What does `json.dumps` do?"), a is the first paragraph of its docstring.
    DIR/corpus_summary.json   documents, bytes and files per part and split

Held-out data is chosen per source module (or pydoc topic) by a seeded hash, so a
module's docstrings, its source and its chat questions all land in the same split and
validation never overlaps train. ``--max-mb`` caps the raw UTF-8 text of the slimpajama
and starcoder parts together (70% is offered to natural language, which the stdlib only
has ~2.5 MB of, the rest to code); the chat data is capped by ``--chat-pairs``. Documents
are taken whole, in seeded-hash order, until each split's share of the budget is full.
The same Python + seed + options gives byte-identical files.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

MB = 1_000_000
NL_SHARE = 0.7                 # TinyLlama mixes SlimPajama:StarCoder 7:3
SLIMPAJAMA_FILE_BYTES = 512_000  # ~target size of one .jsonl.zst (before compression)
STARCODER_FILE_BYTES = 1_000_000
TRAIN_CHUNKS = 2               # train files alternate between chunk1/ and chunk2/
MIN_DOCSTRING_CHARS = 200      # a module needs this much prose to make an article
GITHUB_EVERY = 40              # ~1 module in 40 also appears as a raw RedPajamaGithub doc
GITHUB_MAX_BYTES = 20_000
ANSWER_MAX_CHARS = 400
ANSWER_MIN_CHARS = 40
PARTS = ("slimpajama", "starcoder", "chat")

# Directories that are not "the standard library" proper: test suites and their
# fixtures (lib2to3 ships deliberately broken Python), IDLE, third-party packages.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages",
                 "dist-packages", "__pycache__", "lib-dynload", "ensurepip"}
QUESTION_TEMPLATES = {
    "function": ("What does `{name}` do?", "Explain `{name}`.", "What is `{name}` used for?",
                 "In Python's standard library, what does `{name}` do?"),
    "class": ("What is the `{name}` class?", "Explain `{name}`.", "What is `{name}` used for?",
              "In Python's standard library, what is `{name}`?"),
}


class CorpusError(RuntimeError):
    """A problem the user can fix (bad option, unusable output directory)."""


def _hash(*parts: object) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_of(doc_id: str, seed: int, val_fraction: float) -> str:
    """'validation' or 'train' for a source (module path or topic), seeded and stable."""
    return "validation" if _hash(seed, "split", doc_id) < val_fraction * 2**64 else "train"


# ----------------------------------------------------------------------------- sources

@dataclass
class Docstring:
    qualname: str      # "json.JSONDecoder.decode"
    kind: str          # "module" | "class" | "function"
    signature: str     # "decode(self, s, _w=...)" for functions, "" otherwise
    text: str          # inspect.cleandoc'ed docstring


@dataclass
class Module:
    relpath: str       # "json/decoder.py", relative to the stdlib root
    name: str          # "json.decoder"
    source: str
    docstrings: list[Docstring] = field(default_factory=list)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted, test suites etc. excluded."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place (and sort) so os.walk's order is deterministic too.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in EXCLUDED_DIRS and not d.startswith("config-"))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            # _sysconfigdata_* is build-machine specific generated data, not code.
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def module_name(relpath: str) -> str:
    parts = relpath[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_generated(source: str) -> bool:
    """Machine-generated tables (the charmap codecs, pydoc topics): not useful code."""
    head = source[:600]
    return "gencodec.py" in head or "Autogenerated by Sphinx" in head


class StdlibReader:
    """Reads and parses stdlib modules lazily (only what the budgets need), once each."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, Module | None] = {}
        self.skipped: list[str] = []

    def size(self, relpath: str) -> int:
        return (self.root / relpath).stat().st_size

    def get(self, relpath: str) -> Module | None:
        """The parsed module, or None if it does not decode as UTF-8 or parse."""
        if relpath not in self._cache:
            self._cache[relpath] = self._load(relpath)
        return self._cache[relpath]

    def _load(self, relpath: str) -> Module | None:
        try:
            source = (self.root / relpath).read_bytes().decode("utf-8")
            tree = ast.parse(source, filename=relpath)
        except (UnicodeDecodeError, SyntaxError, ValueError) as exc:
            self.skipped.append(f"{relpath}: {type(exc).__name__}")
            return None
        module = Module(relpath, module_name(relpath), source)
        module.docstrings = list(_docstrings(tree, module.name))
        return module


def _docstrings(tree: ast.Module, modname: str):
    """Module, class and function docstrings in source order; private names skipped."""
    doc = ast.get_docstring(tree)
    if doc:
        yield Docstring(modname, "module", "", doc)

    def visit(body, prefix):
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            qualname = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                if doc:
                    yield Docstring(qualname, "class", "", doc)
                yield from visit(node.body, qualname)
            elif doc:
                args = ast.unparse(node.args)
                if args.startswith("self, ") or args in ("self", "cls") or args.startswith("cls, "):
                    args = args.split(",", 1)[1].strip() if "," in args else ""
                yield Docstring(qualname, "function", f"{node.name}({args})", doc)

    yield from visit(tree.body, modname)


def wiki_article(module: Module) -> str | None:
    """A Wikipedia-like article about one module made of its docstrings."""
    if sum(len(d.text) for d in module.docstrings) < MIN_DOCSTRING_CHARS:
        return None
    sections = [module.name]
    for d in module.docstrings:
        if d.kind == "module":
            sections.append(d.text)
        else:
            owner = d.qualname.rsplit(".", 1)[0]
            heading = f"{owner}.{d.signature}" if d.kind == "function" else f"class {d.qualname}"
            sections.append(f"{heading}\n\n{d.text}")
    return "\n\n".join(sections) + "\n"


def first_paragraph(doc: str) -> str | None:
    """The docstring's first paragraph, one line, at most ANSWER_MAX_CHARS, whole sentences."""
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    if len(text) > ANSWER_MAX_CHARS:
        # Cut at the last sentence end that fits; an answer cut mid-sentence teaches nothing.
        cut = max(text.rfind(". ", 0, ANSWER_MAX_CHARS), text.rfind("! ", 0, ANSWER_MAX_CHARS))
        if cut < ANSWER_MIN_CHARS:
            return None
        text = text[:cut + 1]
    if len(text) < ANSWER_MIN_CHARS or len(text.split()) < 6 or not text[0].isalpha():
        return None
    return text


def chat_pairs(module: Module, seed: int) -> list[tuple[str, str]]:
    """(question, answer) pairs for the public, well documented classes and functions."""
    if any(part.startswith("_") for part in module.name.split(".")):
        return []
    pairs = []
    for d in module.docstrings:
        if d.kind == "module":
            continue
        answer = first_paragraph(d.text)
        if answer is None:
            continue
        templates = QUESTION_TEMPLATES[d.kind]
        question = templates[_hash(seed, "template", d.qualname) % len(templates)]
        pairs.append((question.format(name=d.qualname), answer))
    return pairs


# ----------------------------------------------------------------------------- writers

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _split_evenly(items: list, sizes: list[int], target_bytes: int, min_files: int) -> list[list]:
    """Contiguous groups of ~equal bytes: ceil(total/target) of them, at least min_files."""
    total = sum(sizes)
    if not items:
        return []
    n = min(len(items), max(min_files, math.ceil(total / target_bytes)))
    groups: list[list] = [[] for _ in range(n)]
    seen = 0
    for item, size in zip(items, sizes):
        groups[min(n - 1, seen * n // max(total, 1))].append(item)
        seen += size
    return [g for g in groups if g]


def write_slimpajama(root: Path, split: str, docs: list[dict]) -> list[str]:
    import zstandard

    lines = [(json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8") for d in docs]
    groups = _split_evenly(lines, [len(x) for x in lines], SLIMPAJAMA_FILE_BYTES, min_files=2)
    # Single-threaded, fixed level: zstd output is then a pure function of the input.
    cctx = zstandard.ZstdCompressor(level=10)
    written = []
    for i, group in enumerate(groups):
        if split == "train":
            rel = f"{split}/chunk{i % TRAIN_CHUNKS + 1}/example_train_{i // TRAIN_CHUNKS}.jsonl.zst"
        else:
            rel = f"{split}/chunk1/example_holdout_{i}.jsonl.zst"
        _atomic_write(root / rel, cctx.compress(b"".join(group)))
        written.append(rel)
    return written


def write_starcoder(root: Path, split: str, rows: list[dict]) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = [len(r["content"].encode("utf-8")) for r in rows]
    groups = _split_evenly(rows, sizes, STARCODER_FILE_BYTES, min_files=2)
    written = []
    for i, group in enumerate(groups):
        table = pa.table({
            "content": pa.array([r["content"] for r in group], pa.string()),
            "max_stars_repo_path": pa.array([r["max_stars_repo_path"] for r in group], pa.string()),
            "max_stars_repo_name": pa.array(["python/cpython"] * len(group), pa.string()),
        })
        rel = f"{split}/python/{split}-{i:05d}-of-{len(groups):05d}.parquet"
        buf = io.BytesIO()
        # Small row groups so a streaming reader never holds a whole file's text.
        pq.write_table(table, buf, row_group_size=256, compression="zstd")
        _atomic_write(root / rel, buf.getvalue())
        written.append(rel)
    return written


def write_chat(path: Path, pairs: list[tuple[str, str]]) -> None:
    out = []
    for q, a in pairs:
        record = {"prompt": q, "prompt_id": hashlib.sha256(q.encode("utf-8")).hexdigest(),
                  "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        out.append(json.dumps(record, ensure_ascii=False) + "\n")
    _atomic_write(path, "".join(out).encode("utf-8"))


# ----------------------------------------------------------------------------- builder

class Budget:
    """Bytes left per split; a split is full once what is left cannot take a document."""

    def __init__(self, total: int, val_fraction: float):
        self.left = {"validation": int(total * val_fraction)}
        self.left["train"] = total - self.left["validation"]

    def full(self, split: str) -> bool:
        return self.left[split] < 256

    def take(self, split: str, nbytes: int) -> bool:
        if nbytes > self.left[split]:
            return False
        self.left[split] -= nbytes
        return True


def build_corpus(out: Path, max_mb: float = 20.0, val_fraction: float = 0.05, seed: int = 0,
                 chat_pairs_max: int = 3000, progress: bool = True) -> dict:
    """Write the corpus under `out` (see the module docstring) and return its summary."""
    from tqdm import tqdm

    if not max_mb > 0:
        raise CorpusError(f"--max-mb must be > 0 (got {max_mb})")
    if not 0 < val_fraction < 1:
        raise CorpusError(f"--val-fraction must be between 0 and 1 exclusive (got {val_fraction})")
    if chat_pairs_max < 0:
        raise CorpusError(f"--chat-pairs must be >= 0 (got {chat_pairs_max})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} exists and is not a directory; pass a directory path")

    root = stdlib_root()
    reader = StdlibReader(root)
    files = list_stdlib_files(root)
    if not files:
        raise CorpusError(f"no .py files found under the standard library at {root}")
    split = {f: split_of(f"stdlib:{f}", seed, val_fraction) for f in files}
    # One seeded order for every part: which modules fill a small budget is the same
    # for the natural-language and the code part.
    order = sorted(files, key=lambda f: _hash(seed, "order", f))
    budget_bytes = int(max_mb * MB)

    # --- natural language (SlimPajama) -------------------------------------------------
    from pydoc_data.topics import topics

    candidates = sorted([("module", f) for f in files] + [("topic", k) for k in topics],
                        key=lambda c: _hash(seed, "order", c[0], c[1]))
    nl_budget = Budget(int(budget_bytes * NL_SHARE), val_fraction)
    nl_docs: dict[str, list[dict]] = {"train": [], "validation": []}
    for kind, key in tqdm(candidates, desc="natural language", unit="doc", disable=not progress):
        s = split[key] if kind == "module" else split_of(f"topic:{key}", seed, val_fraction)
        if nl_budget.full(s):
            continue
        if kind == "topic":
            docs = [(topics[key].strip() + "\n", "RedPajamaBook")] if topics[key].strip() else []
        else:
            module = reader.get(key)
            article = wiki_article(module) if module else None
            docs = [(article, "RedPajamaWikipedia")] if article else []
            if module and _hash(seed, "github", key) % GITHUB_EVERY == 0 and module.source.strip() \
                    and len(module.source) <= GITHUB_MAX_BYTES and not is_generated(module.source):
                docs.append((module.source, "RedPajamaGithub"))
        for text, set_name in docs:
            if nl_budget.take(s, len(text.encode("utf-8"))):
                nl_docs[s].append({"text": text, "meta": {"redpajama_set_name": set_name}})
    nl_used = sum(len(d["text"].encode("utf-8")) for docs in nl_docs.values() for d in docs)

    # --- code (StarCoder): what natural language left unused goes to code ----------------
    code_budget = Budget(budget_bytes - nl_used, val_fraction)
    code_rows: dict[str, list[dict]] = {"train": [], "validation": []}
    for f in tqdm(order, desc="code", unit="file", disable=not progress):
        s = split[f]
        # Check the size on disk first so a small budget never parses big files.
        if code_budget.full(s) or reader.size(f) > code_budget.left[s] or f == "pydoc_data/topics.py":
            continue
        module = reader.get(f)
        if module is None or is_generated(module.source) or not module.source.strip():
            continue
        if code_budget.take(s, len(module.source.encode("utf-8"))):
            code_rows[s].append({"content": module.source, "max_stars_repo_path": f"Lib/{f}"})

    # --- chat (UltraChat layout) --------------------------------------------------------
    chat_cap = {"test": round(chat_pairs_max * val_fraction)}
    chat_cap["train"] = chat_pairs_max - chat_cap["test"]
    chat: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    seen_prompts: set[str] = set()
    for f in tqdm(order, desc="chat", unit="file", disable=not progress):
        if all(len(chat[k]) >= chat_cap[k] for k in chat):
            break
        s = "test" if split[f] == "validation" else "train"
        if len(chat[s]) >= chat_cap[s]:
            continue
        module = reader.get(f)
        for q, a in (chat_pairs(module, seed) if module else []):
            if q not in seen_prompts and len(chat[s]) < chat_cap[s]:
                seen_prompts.add(q)
                chat[s].append((q, a))

    # --- write: build everything in a scratch directory, then swap each part in ---------
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".building"
    if scratch.exists():
        shutil.rmtree(scratch)  # left by an interrupted run; it is ours
    summary: dict = {"python": sys.version.split()[0], "seed": seed, "val_fraction": val_fraction,
                     "max_mb": max_mb, "chat_pairs": chat_pairs_max,
                     "skipped_files": sorted(reader.skipped)}
    sp = summary["slimpajama"] = {}
    for s, docs in nl_docs.items():
        by_set: dict[str, int] = {}
        for d in docs:
            name = d["meta"]["redpajama_set_name"]
            by_set[name] = by_set.get(name, 0) + 1
        sp[s] = {"documents": len(docs), "bytes": sum(len(d["text"].encode()) for d in docs),
                 "by_set": dict(sorted(by_set.items())),
                 "files": write_slimpajama(scratch / "slimpajama", s, docs)}
    sc = summary["starcoder"] = {}
    for s, rows in code_rows.items():
        sc[s] = {"documents": len(rows), "bytes": sum(len(r["content"].encode()) for r in rows),
                 "files": write_starcoder(scratch / "starcoder", s, rows)}
    ch = summary["chat"] = {}
    for s, pairs in chat.items():
        write_chat(scratch / "chat" / f"{s}.jsonl", pairs)
        ch[s] = {"documents": len(pairs), "bytes": sum(len((q + a).encode()) for q, a in pairs),
                 "files": [f"{s}.jsonl"]}
    for part in PARTS:
        if (out / part).exists():
            shutil.rmtree(out / part)   # stale files from a bigger earlier run would be read too
        if (scratch / part).exists():
            os.replace(scratch / part, out / part)
    shutil.rmtree(scratch)
    _atomic_write(out / "corpus_summary.json",
                  (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return summary


def format_summary(summary: dict) -> str:
    rows = [f"{'part':<12}{'split':<12}{'documents':>10}{'MB':>9}{'files':>7}"]
    for part in PARTS:
        for s, info in summary[part].items():
            rows.append(f"{part:<12}{s:<12}{info['documents']:>10}{info['bytes'] / MB:>9.2f}"
                        f"{len(info['files']):>7}")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory to write the corpus to")
    p.add_argument("--max-mb", type=float, default=20.0,
                   help="cap on raw text of slimpajama + starcoder together, in MB (default 20; "
                        "the whole stdlib gives ~13)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of modules/topics held out for validation and chat test (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and selection order")
    p.add_argument("--chat-pairs", type=int, default=3000,
                   help="at most this many question/answer pairs, train + test (default 3000)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = build_corpus(args.out, args.max_mb, args.val_fraction, args.seed, args.chat_pairs)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    for part in PARTS:
        for split, info in summary[part].items():
            if not info["documents"]:
                knob = "--chat-pairs" if part == "chat" else "--max-mb"
                print(f"warning: {part}/{split} is empty; raise {knob} or --val-fraction to fill it",
                      file=sys.stderr)
    if summary["skipped_files"]:
        print(f"skipped {len(summary['skipped_files'])} stdlib files that do not decode/parse "
              f"(listed in corpus_summary.json)")
    print(f"wrote {args.out / 'corpus_summary.json'} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
