"""The repository's one tokenizer: a sentencepiece `.model` or an HF `tokenizer.json`.

Every command (data_prep, pretraining, SFT, SPIN, generation, chat, export) loads its
tokenizer here, from a file or from a directory (a checkpoint, an HF model directory):

    DIR/tokenizer.json         an HF tokenizer, run by the `tokenizers` library (preferred
                               when a directory has both, as transformers does)
    DIR/tokenizer.model        a sentencepiece model
    DIR/tokenizer_config.json  bos/eos/pad/unk_token, add_bos_token, added_tokens_decoder
    DIR/special_tokens_map.json  the same names (older HF directories); tokenizer_config wins
    DIR/generation_config.json   eos_token_id, an id or a list: generation stops on any of them

The three JSON files are read beside a tokenizer given as a directory or as a file with
its canonical name (tokenizer.json / tokenizer.model); a file with another name (e.g.
llama2-tokenizer.model) stands alone. A sentencepiece model without them takes its special
ids from the model; an HF tokenizer.json has no notion of EOS, so it needs a
tokenizer_config.json (or special_tokens_map.json) naming eos_token.

`encode` gives a text's ids without special tokens; `prefix_ids` are the ids the tokenizer
puts before a text (its BOS, where it adds one: sentencepiece/Llama, Llama-3; not SmolLM2).
`decode` skips special tokens. `encode_chat` tokenizes a rendered chat template the way
transformers' apply_chat_template does. `sha256` changes when the ids a text gets or the
special tokens change: for a sentencepiece model with its own special ids it is the file's
sha256, as before the HF backend existed, so runs made then still resume.

A `Tokenizer` pickles as its files' bytes (data_prep hands it to worker processes); each
process builds its own backend on first use.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
GENERATION_FILE = "generation_config.json"
SPECIAL_FILES = (CONFIG_FILE, SPECIAL_MAP_FILE, GENERATION_FILE)
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
USAGE = "a sentencepiece .model, an HF tokenizer.json, or a directory holding one"


def token_text(value) -> str | None:
    """A special token as HF files write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- finding the files -------------------------------------------------------------------
def tokenizer_file(path: str | os.PathLike) -> Path | None:
    """The tokenizer file `path` names: itself, or the one in a directory (tokenizer.json first)."""
    path = Path(path)
    if path.is_dir():
        for name in (HF_FILE, SP_FILE):
            if (path / name).is_file():
                return path / name
        return None
    return path if path.is_file() else None


def tokenizer_files(path: str | os.PathLike) -> dict[str, Path]:
    """Every file that defines the tokenizer at `path`, by the name it has in a checkpoint:
    the tokenizer file (tokenizer.json or tokenizer.model) and the special-token files beside
    it (see the module docstring for when they are read). Empty when there is no tokenizer."""
    file = tokenizer_file(path)
    if file is None:
        return {}
    name = HF_FILE if _is_hf(file) else SP_FILE
    files = {name: file}
    if Path(path).is_dir() or file.name in (HF_FILE, SP_FILE):
        files.update((n, file.parent / n) for n in SPECIAL_FILES if (file.parent / n).is_file())
    return files


def _is_hf(file: Path) -> bool:
    return file.suffix == ".json"


# ---- backends ----------------------------------------------------------------------------
class _SentencePiece:
    kind = "sentencepiece"

    def __init__(self, data: bytes, path: Path):
        import sentencepiece as spm

        self.data = data
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on bad protos
            raise ValueError(f"{path} is not a sentencepiece model ({e}); pass {USAGE}") from e
        self._plain = None  # the same model without the dummy-prefix space (encode_chat)

    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def native_ids(self) -> dict[str, int]:
        ids = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id(), "unk_token": self.sp.unk_id(),
               "pad_token": self.sp.pad_id()}
        return {k: v for k, v in ids.items() if v >= 0}

    def special_ids(self) -> set[int]:
        return {i for i in range(self.sp.vocab_size()) if self.sp.is_control(i)}

    def token_to_id(self, text: str) -> int | None:
        token_id = self.sp.piece_to_id(text)
        unk = self.sp.unk_id()
        return None if token_id == unk and text != self.sp.id_to_piece(unk) else token_id

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def adds_prefix_space(self) -> bool:
        return self._proto().normalizer_spec.add_dummy_prefix

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int, add_bos=False, add_eos=False, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def encode_chat(self, text: str, specials: dict[str, int]) -> list[int]:
        """As transformers' Llama tokenizer encodes rendered text: special-token strings become
        their ids, and only the text at offset 0 gets sentencepiece's leading space."""
        if not specials:
            return self.encode(text)
        pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        ids, pos = [], 0
        for match in pattern.finditer(text):
            ids += self._encode_part(text[pos:match.start()], at_start=pos == 0)
            ids.append(specials[match.group()])
            pos = match.end()
        return ids + self._encode_part(text[pos:], at_start=pos == 0)

    def _encode_part(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if at_start:
            return self.sp.encode(text)
        if self._plain is None:
            import sentencepiece as spm

            proto = self._proto()
            proto.normalizer_spec.add_dummy_prefix = False
            self._plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._plain.encode(text)

    def _proto(self):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.data)
        return proto


class _HFTokenizers:
    kind = "tokenizer.json"

    def __init__(self, data: bytes, path: Path):
        try:
            import tokenizers
        except ImportError as e:
            raise ValueError(f"{path}: reading an HF tokenizer.json needs the `tokenizers` package "
                             f"(pip install tokenizers; it is in setup.py's install_requires)") from e
        try:
            self.tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path} is not an HF tokenizer.json ({e}); pass {USAGE}") from e

    def vocab_size(self) -> int:
        # Ids need not be contiguous (added tokens): the embedding needs a row for the largest one.
        return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def native_ids(self) -> dict[str, int]:
        return {}  # tokenizer.json does not say which token is BOS or EOS

    def special_ids(self) -> set[int]:
        return {i for i, token in self.tok.get_added_tokens_decoder().items() if token.special}

    def token_to_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def adds_prefix_space(self) -> bool:
        """Metaspace (sentencepiece converted to tokenizer.json) puts "▁" before the first word."""
        first = self.tok.encode("a", add_special_tokens=False).tokens
        return bool(first) and first[0].startswith("▁")

    def post_processor_prefix(self) -> list[int]:
        """The ids the tokenizer's post-processor puts before a text (e.g. Llama-3's BOS)."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
        return full[:at]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_chat(self, text: str, specials: dict[str, int]) -> list[int]:
        # What transformers does with a rendered template: tokenizer(text, add_special_tokens=False);
        # the added tokens of tokenizer.json are split out by the library itself.
        return self.encode(text)


# ---- the tokenizer -----------------------------------------------------------------------
class Tokenizer:
    """One tokenizer, either backend. Attributes:

    path          the tokenizer file (tokenizer.json or a sentencepiece .model)
    kind          "sentencepiece" or "tokenizer.json"
    vocab_size    ids are < vocab_size (the embedding needs at least this many rows)
    bos_id, eos_id, pad_id, unk_id   from the special-token files, else the model's own; bos and
                  unk may be None, eos never is; pad is eos when there is none (padding is masked)
    prefix_ids    the ids put before a text (BOS, when the tokenizer adds one)
    stop_ids      EOS and generation_config.json's eos_token_id list: generation stops on any
    special_tokens  the strings a chat template sees as bos_token, eos_token, unk_token, pad_token
    sha256        changes with the ids a text gets and with the special tokens
    """

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        self.source = Path(path)
        files = tokenizer_files(self.source)
        if not files:
            raise FileNotFoundError(f"tokenizer {self.source} not found (pass {USAGE})")
        self.path = files.get(HF_FILE, files.get(SP_FILE))
        self.files = {name: file.read_bytes() for name, file in files.items()}
        self._backend = None
        self._resolve(eos_token)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_backend"} | {"_backend": None}

    @property
    def backend(self):
        if self._backend is None:
            name = HF_FILE if HF_FILE in self.files else SP_FILE
            cls = _HFTokenizers if name == HF_FILE else _SentencePiece
            self._backend = cls(self.files[name], self.path)
        return self._backend

    @property
    def kind(self) -> str:
        return self.backend.kind

    def _config(self, name: str) -> dict:
        return _read_json(self.path.parent / name) if name in self.files else {}

    def _resolve(self, eos_override: str | None) -> None:
        backend = self.backend
        config, special_map = self._config(CONFIG_FILE), self._config(SPECIAL_MAP_FILE)
        self.vocab_size = backend.vocab_size()
        native = backend.native_ids()
        self.special_tokens: dict[str, str] = {}
        ids: dict[str, int] = {}
        for name in TOKEN_NAMES:
            text, where = token_text(config.get(name)), self.path.parent / CONFIG_FILE
            if name == "eos_token" and eos_override is not None:
                text, where = eos_override, "--eos-token"
            if text is None:
                text, where = token_text(special_map.get(name)), self.path.parent / SPECIAL_MAP_FILE
            if text is None:
                if name in native:
                    ids[name] = native[name]
                    self.special_tokens[name] = backend.id_to_token(native[name])
                continue
            token_id = backend.token_to_id(text)
            if token_id is None:
                fix = "name one of its tokens" if where == "--eos-token" else \
                    f"the files do not belong together (fix {name} in that file)"
                raise ValueError(f"{where}: {name} {text!r} is not a token of {self.path}; {fix}")
            ids[name], self.special_tokens[name] = token_id, text
        if "eos_token" not in ids:
            fix = ("train the tokenizer with eos_id set (e.g. eos_id=2) or name eos_token in a " + CONFIG_FILE
                   if backend.kind == "sentencepiece" else f"put a {CONFIG_FILE} naming eos_token beside it")
            raise ValueError(f"{self.path} defines no EOS piece: documents and answers end with EOS; {fix} "
                             f"(data_prep also takes --eos-token TEXT)")
        self.bos_id, self.eos_id, self.unk_id = ids.get("bos_token"), ids["eos_token"], ids.get("unk_token")
        self.pad_id = ids.get("pad_token", self.eos_id)
        self.added = self._added_tokens(config)
        self.special_ids = frozenset(backend.special_ids() | set(ids.values()) - {self.unk_id}
                                     | {i for i, (_, special) in self.added.items() if special})
        self.prefix_ids = self._prefix(config)
        self.stop_ids = self._stops()
        specials = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "prefix": self.prefix_ids}
        data = self.files[HF_FILE if HF_FILE in self.files else SP_FILE]
        native_pad = native.get("pad_token", native.get("eos_token"))
        if backend.kind == "sentencepiece" and specials == {"bos": native.get("bos_token"), "eos": native.get(
                "eos_token"), "pad": native_pad, "prefix": [native["bos_token"]] if "bos_token" in native else []}:
            self.sha256 = hashlib.sha256(data).hexdigest()  # the file's own, as before the JSON files counted
        else:
            extra = json.dumps({**specials, "added": sorted(self.added)}, sort_keys=True).encode()
            self.sha256 = hashlib.sha256(data + b"\0" + extra).hexdigest()

    def _added_tokens(self, config: dict) -> dict[int, tuple[str, bool]]:
        """tokenizer_config.json's added_tokens_decoder, checked against the tokenizer file."""
        added = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            text = token_text(entry)
            if text is None or not str(key).isdigit():
                continue
            if self.backend.token_to_id(text) != int(key):
                raise ValueError(f"{self.path.parent / CONFIG_FILE}: added token {text!r} (id {key}) is not in "
                                 f"{self.path}; tokens added on top of a tokenizer file are not supported")
            added[int(key)] = (text, bool(entry.get("special", True)) if isinstance(entry, dict) else True)
        return added

    def _prefix(self, config: dict) -> list[int]:
        add_bos = config.get("add_bos_token")
        if self.kind == "sentencepiece":  # transformers' Llama tokenizer adds BOS unless told not to
            add_bos = add_bos is not False
        elif not isinstance(add_bos, bool):  # tokenizer.json's post-processor decides (transformers 5)
            return self.backend.post_processor_prefix()
        return [self.bos_id] if add_bos and self.bos_id is not None else []

    def _stops(self) -> tuple[int, ...]:
        stops = [self.eos_id]
        if GENERATION_FILE in self.files:
            path = self.path.parent / GENERATION_FILE
            value = _read_json(path).get("eos_token_id")
            listed = value if isinstance(value, list) else [] if value is None else [value]
            for token_id in listed:
                if not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                    raise ValueError(f"{path}: eos_token_id {value!r} must be an id or a list of ids below the "
                                     f"tokenizer's {self.vocab_size}")
                if token_id not in stops:
                    stops.append(token_id)
        return tuple(stops)

    # ---- ids and text ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The text's ids, no special tokens added (sentencepiece: with its leading space)."""
        return self.backend.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.backend.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens (BOS, EOS, padding, end-of-turn...) left out."""
        return self.backend.decode([i for i in ids if i not in self.special_ids])

    def encode_chat(self, text: str, specials: dict[str, int] | None = None) -> list[int]:
        """A rendered chat template's ids as transformers' apply_chat_template gives them:
        special-token strings are their ids (`specials` adds strings a sentencepiece model
        does not know as special; tokenizer.json knows its own)."""
        known = {text: i for name, text in self.special_tokens.items() if name != "unk_token"
                 for i in [self.token_to_id(text)] if i is not None}
        known.update((text, i) for i, (text, _) in self.added.items())
        return self.backend.encode_chat(text, known | (specials or {}))

    def token_to_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)

    @property
    def adds_prefix_space(self) -> bool:
        """True when a text's first word gets a leading space (sentencepiece's dummy prefix)."""
        return self.backend.adds_prefix_space()

    def describe(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "bos_id": self.bos_id}

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's files into `directory` unchanged, under their canonical names."""
        from model.atomic import write_bytes

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            write_bytes(directory / name, data)


def resolve_tokenizer_path(ckpt: str | os.PathLike | None, override: str | os.PathLike | None) -> Path:
    """--tokenizer (a file or directory) when given, else the checkpoint directory."""
    if override is not None:
        path = Path(override)
        if tokenizer_file(path) is None:
            what = "holds no tokenizer.json or tokenizer.model" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"--tokenizer {path} {what} (pass {USAGE})")
        return path
    if ckpt is not None and tokenizer_file(Path(ckpt)) is not None:
        return Path(ckpt)
    where = Path(ckpt) / SP_FILE if ckpt is not None else "the checkpoint's tokenizer.model"
    raise FileNotFoundError(f"no tokenizer: {where} does not exist and neither does {HF_FILE}; "
                            f"pass --tokenizer FILE ({USAGE})")


def load_tokenizer(ckpt=None, override=None, model_vocab_size: int | None = None,
                   eos_token: str | None = None) -> Tokenizer:
    """The tokenizer of `ckpt` (or `override`), checked against the model's vocabulary;
    `eos_token` replaces its EOS (data_prep's --eos-token)."""
    tok = Tokenizer(resolve_tokenizer_path(ckpt, override), eos_token)
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        unit = "pieces" if tok.kind == "sentencepiece" else "tokens"
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} {unit} but the model's vocab_size is "
                         f"{model_vocab_size}: ids >= {model_vocab_size} cannot be embedded; use the "
                         f"tokenizer the model was trained with")
    return tok
