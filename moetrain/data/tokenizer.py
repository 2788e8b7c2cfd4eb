"""Tokenizers: the built-in byte tokenizer and a wrapper over a Hugging Face ``tokenizer.json``.

Both expose the same small contract (``Tokenizer``): ``name``, ``vocab_size``, ``eos_id``,
``encode``, ``decode`` and ``encode_documents`` (many texts -> one flat token array with an
end-of-text token after each document), which is all the data pipeline needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np

from moetrain.data.config import BYTE_TOKENIZER

# Special tokens looked for, in order, to find a Hugging Face tokenizer's end-of-text token.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk/in-memory token dtype: little-endian uint16 up to 65,536 ids, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class Tokenizer:
    """The contract of a tokenizer: subclasses set ``name``/``vocab_size``/``eos_id``."""

    name: str
    vocab_size: int
    eos_id: Optional[int]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are skipped."""
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """All ``texts`` tokenized and concatenated, each followed by ``eos_id``.

        Returns a 1-D array of ``token_dtype(vocab_size)``. Raises ``ValueError`` naming
        ``data.tokenizer`` when the tokenizer has no end-of-text token.
        """
        eos = self.require_eos()
        return _concat_with_eos([self.encode(t) for t in texts], eos, token_dtype(self.vocab_size))

    def require_eos(self) -> int:
        """``eos_id``, or a ``ValueError`` naming ``data.tokenizer`` when there is none."""
        if self.eos_id is None:
            raise ValueError(
                f"data.tokenizer: {self.name!r} has no end-of-text special token (looked for "
                f"{', '.join(EOS_NAMES)}); add one to the tokenizer's added_tokens with "
                '"special": true'
            )
        return self.eos_id


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then ``<bos>``=256, ``<eos>``=257, ``<pad>``=258."""

    bos_id = 256
    pad_id = 258

    def __init__(self) -> None:
        self.name = BYTE_TOKENIZER
        self.vocab_size = 259
        self.eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes of the ids below 256 decoded as UTF-8 (``errors="replace"``); specials skipped.

        Raises ``ValueError`` for an id outside ``[0, vocab_size)``.
        """
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"byte tokenizer: ids {bad[:5]} are outside [0, {self.vocab_size})")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        # Fast path: the bytes are the ids, no per-token Python work.
        pieces = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        return _concat_with_eos(pieces, self.require_eos(), token_dtype(self.vocab_size))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    ``vocab_size`` counts added tokens; ``eos_id`` is the first special token whose text is
    in ``EOS_NAMES`` (else one containing "eos" or "endoftext"), or None when there is none.
    ``encode`` adds no special tokens (no BOS/post-processor templates).
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"data.tokenizer: {path!r} does not exist; give the path of a Hugging Face "
                "tokenizer.json or use 'byte'"
            )
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as err:  # the Rust side raises a bare Exception on a bad file
            raise ValueError(
                f"data.tokenizer: {path!r} is not a valid Hugging Face tokenizer.json ({err})"
            ) from err
        self.name = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _find_eos(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=True))

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        eos = self.require_eos()
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        pieces = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        return _concat_with_eos(pieces, eos, token_dtype(self.vocab_size))


def build_tokenizer(name_or_path: str) -> Tokenizer:
    """``"byte"`` -> ``ByteTokenizer``; the path of a ``tokenizer.json`` -> ``HFTokenizer``.

    Raises ``FileNotFoundError`` naming ``data.tokenizer`` for anything else.
    """
    if name_or_path == BYTE_TOKENIZER:
        return ByteTokenizer()
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(
            f"data.tokenizer: {name_or_path!r} is neither 'byte' nor an existing file; give the "
            "path of a Hugging Face tokenizer.json or use 'byte'"
        )
    return HFTokenizer(name_or_path)


def _find_eos(tok) -> Optional[int]:
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for name in EOS_NAMES:
        if name in specials:
            return int(specials[name])
    for content, idx in sorted(specials.items(), key=lambda kv: kv[1]):
        if "eos" in content.lower() or "endoftext" in content.lower():
            return int(idx)
    return None


def _concat_with_eos(pieces: Sequence, eos_id: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate token sequences into one ``dtype`` array with ``eos_id`` after each."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    out = np.empty(int(lengths.sum()) + len(pieces), dtype=dtype)
    pos = 0
    for piece, n in zip(pieces, lengths):
        out[pos : pos + n] = piece
        out[pos + n] = eos_id
        pos += int(n) + 1
    return out
