"""Tokenizers: a byte-level default that needs no training, and a locally trained BPE.

Both expose the same small interface (`Tokenizer`). A tokenizer is identified by its `spec`, a
JSON-able dict that goes into checkpoints and shard manifests so a model is never paired with
the wrong vocabulary: `{"kind": "byte"}` or `{"kind": "bpe", "sha256": ..., "vocab_size": ...}`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt, or does not match what a checkpoint expects."""


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spec(self) -> dict: ...
    def byte_lengths(self) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; three special tokens follow."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Special and out-of-range ids are dropped; a cut multi-byte character decodes as U+FFFD.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each id stands for (0 for the special tokens): bits per byte."""
        return [1] * 256 + [0] * len(SPECIAL_TOKENS)


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` package, stored as its JSON file."""

    def __init__(self, hf_tokenizer, sha256: str) -> None:
        self._tok = hf_tokenizer
        self.sha256 = sha256
        self.vocab_size = hf_tokenizer.get_vocab_size()
        ids = [hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise TokenizerError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        self.bos_id, self.eos_id, self.pad_id = ids

    @classmethod
    def from_file(cls, path: str | Path, expected_sha256: str | None = None) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer {path}: {e.strerror}") from e
        digest = hashlib.sha256(raw).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise TokenizerError(
                f"tokenizer {path} has sha256 {digest[:12]}…, expected {expected_sha256[:12]}…"
            )
        try:
            hf = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the tokenizers package raises a bare Exception on bad JSON
            raise TokenizerError(f"tokenizer {path} is not a valid tokenizer JSON: {e}") from e
        return cls(hf, digest)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def spec(self) -> dict:
        return {"kind": "bpe", "sha256": self.sha256, "vocab_size": self.vocab_size}

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each id stands for (0 for the special tokens): bits per byte. A
        byte-level BPE writes one character per byte, so a token's length is its string's."""
        special = {self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        byte_level = "ByteLevel" in json.dumps(json.loads(self._tok.to_str()).get("pre_tokenizer"))
        lengths = []
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if i in special or token is None:
                lengths.append(0)
            elif byte_level:
                lengths.append(len(token))
            else:
                lengths.append(len(self._tok.decode([i]).encode("utf-8")))
        return lengths


def train_bpe(texts: Iterator[str], vocab_size: int, out_path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE on `texts`, write it to `out_path` (+ `.sha256`), and return it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab size must be at least {256 + len(SPECIAL_TOKENS)}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw = hf.to_str(pretty=False).encode("utf-8")
    out_path.write_bytes(raw)
    digest = hashlib.sha256(raw).hexdigest()
    Path(f"{out_path}.sha256").write_text(f"{digest}  {out_path.name}\n")
    return BPETokenizer(hf, digest)


def load_tokenizer(spec: dict, bpe_path: str | Path | None = None) -> Tokenizer:
    """Rebuild the tokenizer a spec names; a BPE spec needs its JSON file, checked by sha256."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if bpe_path is None:
            raise TokenizerError("a BPE tokenizer spec needs the path of its tokenizer JSON")
        return BPETokenizer.from_file(bpe_path, expected_sha256=spec.get("sha256"))
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in {json.dumps(spec)}")
