"""The whole system, end to end, small enough for a laptop CPU (and on the GPU when there is one).

    python scripts/quickstart.py [--out quickstart_out] [--tokenizer FILE] [--size default|smoke]

Every stage runs the project's own command-line scripts, exactly as a user would on a
cluster, on real data that every machine with Python has:

  1. corpus     scripts/make_local_corpus.py: stdlib docstrings + pydoc topics as SlimPajama
                jsonl.zst, stdlib source as StarCoder parquet, docstring Q&A as UltraChat jsonl
  2. tokenizer  data_prep/train_tokenizer.py (skipped when --tokenizer is given)
  3. tokenize   data_prep/tokenize_slimpajama.py and tokenize_starcoder.py, train + validation
  4. pretrain   fabric run pretrain/tinyllama.py on the 7:3 mixture
  5. finetune   finetune/sft.py, then finetune/spin.py (2 iterations)
  6. export     scripts/convert_hf.py export, scripts/plot_metrics.py, and a summary

A stage whose output is complete is not run again, so an interrupted quickstart continues
where it stopped; --fresh starts over. The launcher is the `fabric` installed beside the
running python (so `.venv/bin/python scripts/quickstart.py` works without activating the
environment), else the one on PATH; pretraining's rendezvous port is MASTER_PORT when set,
else one reserved for the run (pretrain/ports.py), never a fixed default another run may hold.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    """How big each stage is. 'default' is the README's ~10-minute run on 2 CPU cores;
    'smoke' is the CI test's seconds-to-minutes run of the very same pipeline."""
    corpus_mb: float
    vocab_size: int
    model: str
    block_size: int
    pretrain_steps: int
    global_batch: int
    micro_batch: int
    sft_steps: int
    spin_prompts: int
    spin_iterations: int
    max_new_tokens: int
    chat_pairs: int


SIZES = {
    "default": Size(corpus_mb=4.0, vocab_size=4096, model="nano", block_size=256, pretrain_steps=160,
                    global_batch=16, micro_batch=8, sft_steps=100, spin_prompts=64, spin_iterations=2,
                    max_new_tokens=48, chat_pairs=1500),
    "smoke": Size(corpus_mb=0.3, vocab_size=512, model="tiny", block_size=64, pretrain_steps=12,
                  global_batch=4, micro_batch=2, sft_steps=6, spin_prompts=8, spin_iterations=2,
                  max_new_tokens=8, chat_pairs=64),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "quickstart_out", help="where everything is written")
    p.add_argument("--tokenizer", type=Path, help="a tokenizer to use (a sentencepiece .model, e.g. Llama-2's, "
                   "or an HF tokenizer.json or directory holding one) instead of training one on the local corpus")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="'smoke' is the CI-sized run")
    p.add_argument("--devices", default="1", help="devices for pretraining (fabric run --devices)")
    p.add_argument("--fresh", action="store_true", help="delete --out first and run every stage")
    return p.parse_args(argv)


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.size = SIZES[args.size]
        self.out = args.out.resolve()
        self.started = time.time()
        self.timings: dict[str, float] = {}

    # ---- helpers ----------------------------------------------------------------------
    def run(self, *cmd: str | Path) -> None:
        cmd = [str(c) for c in cmd]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
                   WANDB_DIR=str(self.out / "wandb"), PYTHONUNBUFFERED="1")
        if not _has_cuda():
            # One intra-op thread per process: on a small CPU, PyTorch's thread pool competing with
            # data-loader workers (or anything else running) is several times slower than one thread.
            env.setdefault("OMP_NUM_THREADS", "1")
        (self.out / "wandb").mkdir(parents=True, exist_ok=True)
        result = subprocess.run(cmd, cwd=REPO, env=env)
        if result.returncode != 0:
            raise SystemExit(f"quickstart: stage command failed with exit code {result.returncode}:\n  {' '.join(cmd)}\n"
                             f"Fix the problem above and run the quickstart again; finished stages are kept.")

    def stage(self, name: str, done_marker: Path, fn) -> None:
        print(f"\n=== [{len(self.timings) + 1}] {name}", flush=True)
        if done_marker.exists():
            print(f"already done ({done_marker.relative_to(self.out)} exists)")
            self.timings[name] = 0.0
            return
        t0 = time.time()
        fn()
        if not done_marker.exists():
            raise SystemExit(f"quickstart: stage {name!r} finished but {done_marker} is missing")
        self.timings[name] = time.time() - t0
        print(f"--- {name}: {self.timings[name]:.0f}s", flush=True)

    @property
    def py(self) -> str:
        return sys.executable

    @property
    def tokenizer(self) -> Path:
        return self.args.tokenizer.resolve() if self.args.tokenizer else self.out / "tokenizer" / "tokenizer.model"

    # ---- stages -----------------------------------------------------------------------
    def corpus(self) -> None:
        self.run(self.py, "scripts/make_local_corpus.py", "--out", self.out / "corpus",
                 "--max-mb", self.size.corpus_mb, "--chat-pairs", self.size.chat_pairs)

    def train_tokenizer(self) -> None:
        text = self.out / "tokenizer" / "train_text.txt"
        write_tokenizer_text(self.out / "corpus", text)
        self.run(self.py, "data_prep/train_tokenizer.py", "--input", text, "--vocab-size", self.size.vocab_size,
                 "--model-prefix", self.tokenizer.with_suffix(""))

    def tokenize(self) -> None:
        corpus, data = self.out / "corpus", self.out / "data"
        for split in ("train", "validation"):
            self.run(self.py, "data_prep/tokenize_slimpajama.py", "--input", corpus / "slimpajama",
                     "--split", split, "--output", data / "slimpajama" / split, "--tokenizer", self.tokenizer,
                     "--workers", 2)
            self.run(self.py, "data_prep/tokenize_starcoder.py", "--input", corpus / "starcoder" / split,
                     "--output", data / "starcoder" / split, "--tokenizer", self.tokenizer, "--workers", 2)
        (data / "DONE").write_text("ok\n")

    def pretrain(self) -> None:
        from pretrain.ports import reserved_port

        with contextlib.ExitStack() as stack:
            port = os.environ.get("MASTER_PORT") or stack.enter_context(reserved_port())
            self._pretrain(port)

    def _pretrain(self, port) -> None:
        data, s = self.out / "data", self.size
        vocab = self._tokenizer_vocab()
        self.run(fabric_launcher(), "run", "--devices", self.args.devices, "--main-port", port,
                 "pretrain/tinyllama.py", "--config", s.model, "--vocab-size", vocab, "--block-size", s.block_size,
                 "--data", f"{data / 'slimpajama' / 'train'}:0.7", f"{data / 'starcoder' / 'train'}:0.3",
                 "--val-data", data / "slimpajama" / "validation", data / "starcoder" / "validation",
                 "--tokenizer", self.tokenizer, "--out", self.out / "pretrain",
                 "--max-steps", s.pretrain_steps, "--global-batch-size", s.global_batch,
                 "--micro-batch-size", s.micro_batch, "--lr", "3e-3", "--min-lr", "3e-4",
                 "--warmup-steps", max(1, s.pretrain_steps // 20), "--seed", 0,
                 "--save-every", max(1, s.pretrain_steps // 2), "--val-every", max(1, s.pretrain_steps // 5),
                 "--log-every", max(1, s.pretrain_steps // 50))

    def sft(self) -> None:
        s = self.size
        self.run(self.py, "finetune/sft.py", "--ckpt", self.out / "pretrain" / "final",
                 "--data", self.out / "corpus" / "chat" / "train.jsonl", "--out", self.out / "sft",
                 "--max-steps", s.sft_steps, "--lr", "1e-3", "--global-batch-size", 16, "--micro-batch-size", 8,
                 "--max-seq-len", s.block_size)

    def spin(self) -> None:
        s = self.size
        self.run(self.py, "finetune/spin.py", "--ckpt", self.out / "sft" / "final",
                 "--data", self.out / "corpus" / "chat" / "train.jsonl", "--out", self.out / "spin",
                 "--iterations", s.spin_iterations, "--num-prompts", s.spin_prompts,
                 "--max-new-tokens", s.max_new_tokens, "--lr", "1e-4", "--global-batch-size", 8,
                 "--micro-batch-size", 4, "--max-len", s.block_size, "--max-prompt-len", s.block_size // 2)

    def export(self) -> None:
        final = self.out / "spin" / f"iter{self.size.spin_iterations}"
        self.run(self.py, "scripts/convert_hf.py", "export", "--ckpt", final, "--out", self.out / "hf")
        metrics = [p for p in (self.out / "pretrain" / "metrics.jsonl", self.out / "sft" / "metrics.jsonl",
                               self.out / "spin" / "metrics.jsonl") if p.exists()]
        self.run(self.py, "scripts/plot_metrics.py", *metrics[:1], "--out", self.out / "pretrain.png",
                 "--title", "pretraining")
        self.run(self.py, "scripts/plot_metrics.py", self.out / "spin" / "metrics.jsonl",
                 "--out", self.out / "spin.png", "--title", "SPIN")
        write_samples(self.out / "corpus" / "chat" / "test.jsonl", before=self.out / "sft" / "final",
                      after=final, out=self.out / "samples.json", max_new_tokens=self.size.max_new_tokens * 2)

    def _tokenizer_vocab(self) -> int:
        from data_prep.tokenizer import Tokenizer

        return Tokenizer(self.tokenizer).vocab_size

    # ---- the whole thing --------------------------------------------------------------
    def main(self) -> None:
        if self.args.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.args.tokenizer and not self.args.tokenizer.exists():
            raise SystemExit(f"quickstart: --tokenizer {self.args.tokenizer} does not exist")
        fabric_launcher()  # before any stage runs: a missing launcher is an install problem
        self.stage("corpus from the standard library", self.out / "corpus" / "corpus_summary.json", self.corpus)
        if not self.args.tokenizer:
            self.stage("train a sentencepiece tokenizer", self.tokenizer, self.train_tokenizer)
        self.stage("tokenize SlimPajama- and StarCoder-format data", self.out / "data" / "DONE", self.tokenize)
        self.stage("pretrain on the 7:3 mixture", self.out / "pretrain" / "final" / "model.safetensors", self.pretrain)
        self.stage("supervised fine-tuning", self.out / "sft" / "final" / "model.safetensors", self.sft)
        self.stage("SPIN self-play fine-tuning",
                   self.out / "spin" / f"iter{self.size.spin_iterations}" / "model.safetensors", self.spin)
        self.stage("export to Hugging Face format, plot, sample answers", self.out / "samples.json", self.export)
        print_summary(self)


class LauncherMissing(Exception):
    """The `fabric` launcher is not installed for this interpreter (exit 2)."""


def fabric_launcher() -> str:
    """The `fabric` command of the running interpreter's environment: beside sys.executable
    (a virtual environment's python run without activating it has no .venv/bin on PATH),
    else on PATH."""
    beside = Path(sys.executable).parent / ("fabric.exe" if os.name == "nt" else "fabric")
    if beside.is_file():
        return str(beside)
    found = shutil.which("fabric")
    if found:
        return found
    raise LauncherMissing(
        f"the Lightning launcher `fabric` is neither beside {sys.executable} nor on PATH; install the project "
        f"into this python's environment (bash scripts/setup_env.sh, or {sys.executable} -m pip install -e .)")


def write_tokenizer_text(corpus: Path, out: Path) -> None:
    """The training split's documents as plain text (sentencepiece reads lines), through
    data_prep's own readers so the tokenizer sees exactly what gets tokenized."""
    from data_prep import slimpajama, starcoder
    from data_prep.errors import BadInputReport
    from model.atomic import atomic_path

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for reader, files in ((slimpajama, slimpajama.find_inputs(corpus / "slimpajama", "train")),
                              (starcoder, starcoder.find_inputs(corpus / "starcoder" / "train"))):
            for path in files:
                for _, text in reader.read_documents(path, BadInputReport(str(path), skip_bad=False)):
                    f.write(text.strip() + "\n")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_samples(test_data: Path, before: Path, after: Path, out: Path, max_new_tokens: int,
                  num_prompts: int = 3) -> None:
    """Greedy answers to held-out prompts from the SFT model and from the last SPIN iterate,
    using finetune's own template and KV-cache generator."""
    from finetune.chat import read_chat
    from finetune.checkpoints import load_start
    from finetune.hf_chat import chat_encoder
    from finetune.generate import generate_batch

    examples = read_chat(test_data, limit=num_prompts)
    answers = {}
    for label, ckpt in (("before", before), ("after", after)):
        model, tok, template = load_start(ckpt, kernels="auto")
        model.eval()
        encoder = chat_encoder(tok, template)
        room = model.config.block_size - max_new_tokens
        prompts = [encoder.prompt_ids(e.prompt, room) for e in examples]
        answers[label] = [tok.decode(ids) for ids in
                          generate_batch(model, prompts, max_new_tokens, encoder.stop_ids, tok.pad_id)]
    rows = [{"prompt": e.prompt, "human": e.response, "before": b, "after": a}
            for e, b, a in zip(examples, answers["before"], answers["after"])]
    out.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_summary(p: Pipeline) -> None:
    out = p.out
    print("\n" + "=" * 72 + "\nquickstart summary\n" + "=" * 72)
    tokens = 0
    for summary in sorted((out / "data").rglob("summary.json")):
        tokens += json.loads(summary.read_text()).get("tokens", 0)
    print(f"tokens prepared (train + validation): {tokens:,}")
    pre = _read_jsonl(out / "pretrain" / "metrics.jsonl")
    train = [m for m in pre if "loss" in m]
    val = [m for m in pre if "val_loss" in m]
    if train:
        print(f"pretraining loss: {train[0]['loss']:.3f} (step {train[0]['step']}) -> "
              f"{train[-1]['loss']:.3f} (step {train[-1]['step']})")
    if val:
        print(f"validation loss {val[-1]['val_loss']:.3f}, perplexity {math.exp(val[-1]['val_loss']):.1f}")
    spin = _read_jsonl(out / "spin" / "metrics.jsonl")
    for it in sorted({m.get("iteration") for m in spin if "rewards/margins" in m}, key=lambda x: (x is None, x)):
        rows = [m for m in spin if m.get("iteration") == it and "rewards/margins" in m]
        print(f"SPIN iteration {it}: reward margin {rows[0]['rewards/margins']:.3f} -> {rows[-1]['rewards/margins']:.3f}, "
              f"accuracy {rows[-1].get('rewards/accuracies', float('nan')):.2f}")
    samples = out / "samples.json"
    if samples.exists():
        for s in json.loads(samples.read_text())[:2]:
            print(f"\nprompt:       {s['prompt']}\n  human:       {s['human'][:200]}\n"
                  f"  before SPIN: {s['before'][:200]!r}\n  after SPIN:  {s['after'][:200]!r}")
    print(f"\npictures: {out / 'pretrain.png'}  {out / 'spin.png'}")
    print(f"HF export: {out / 'hf'} (transformers.LlamaForCausalLM.from_pretrained loads it)")
    total = time.time() - p.started
    print("stage times: " + ", ".join(f"{k.split()[0]} {v:.0f}s" for k, v in p.timings.items()) + f"; total {total:.0f}s")
    final = out / "spin" / f"iter{p.size.spin_iterations}"
    print(f"\nchat with what it trained:  python scripts/chat.py --ckpt {final}")


def main(argv=None) -> int:
    try:
        Pipeline(parse_args(argv)).main()
    except LauncherMissing as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
