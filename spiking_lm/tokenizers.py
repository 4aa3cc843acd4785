"""Character- and byte-level tokenizers whose whole state fits in a small JSON dict.

The dict form (``to_dict()``) is what goes into checkpoints, so a trained model
can always be paired with the exact vocabulary it was trained on.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = [
    "TOKENIZER_KINDS",
    "UNKNOWN_POLICIES",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "UnknownCharacters",
    "build_tokenizer",
    "check_tokenizer_kind",
    "tokenizer_from_dict",
]


# What a char tokenizer does with a character outside its vocabulary, besides mapping it to a given one.
UNKNOWN_POLICIES = ("error", "skip")


class UnknownCharacters(ValueError):
    """A text holds characters outside a char tokenizer's vocabulary (policy ``"error"``)."""


class Tokenizer(Protocol):
    """Interface shared by the tokenizers of this module."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per Unicode character, over a vocabulary fixed at construction.

    The vocabulary is the sorted set of characters of the text it is built
    from. There is no ``<unk>`` token: by default encoding a character outside
    the vocabulary raises ``UnknownCharacters`` naming the offending characters,
    because silently mapping them to a shared id would corrupt the training
    signal. Evaluating a trained model on another text may choose otherwise.

    Args:
        chars: The vocabulary; token ``i`` is ``chars[i]``. Must not repeat a
            character.
        unknown: What encoding does with a character outside the vocabulary:
            ``"error"`` (raise), ``"skip"`` (drop it), or one character of the
            vocabulary to map it to.
    """

    kind = "char"

    def __init__(self, chars: str, unknown: str = "error") -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary repeats characters")
        if not chars:
            raise ValueError("CharTokenizer vocabulary is empty")
        if unknown not in UNKNOWN_POLICIES and (len(unknown) != 1 or unknown not in chars):
            raise ValueError(f"unknown characters: {unknown!r} is neither one of {', '.join(UNKNOWN_POLICIES)}"
                             " nor a character of the vocabulary to map them to")
        self.chars = chars
        self.unknown = unknown
        self._stoi = {c: i for i, c in enumerate(chars)}
        # Sorted code points let encode_array map a whole text with one
        # searchsorted instead of a Python loop over ~10^6 characters.
        order = sorted(range(len(chars)), key=lambda i: ord(chars[i]))
        self._sorted_codes = np.array([ord(chars[i]) for i in order], dtype=np.uint32)
        self._sorted_ids = np.array(order, dtype=np.int64)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from every character that occurs in ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Map each character of ``text`` to its id; unknown ones as ``unknown`` says."""
        return self.encode_array(text).tolist()

    def _lookup(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Code points of ``text``, their ids (meaningless where unknown) and whether each is known."""
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self._sorted_codes) - 1)
        return codes, self._sorted_ids[pos], self._sorted_codes[pos] == codes

    def count_unknown(self, text: str) -> int:
        """How many characters of ``text`` are outside the vocabulary."""
        return int((~self._lookup(text)[2]).sum())

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, returning an int64 array."""
        codes, ids, known = self._lookup(text)
        if known.all():
            return ids
        if self.unknown == "skip":
            return ids[known]
        if self.unknown != "error":
            return np.where(known, ids, self._stoi[self.unknown])
        unknown = sorted({chr(c) for c in codes[~known].tolist()})
        shown = ", ".join(repr(c) for c in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise UnknownCharacters(f"{len(unknown)} character(s) not in the char tokenizer vocabulary: {shown}{more}")

    def decode(self, ids: list[int]) -> str:
        """Map ids back to the characters they stand for."""
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable state, inverse of :meth:`from_dict`."""
        # The default policy is left out, so a vocabulary's dict is the same as before policies existed.
        policy = {"unknown": self.unknown} if self.unknown != "error" else {}
        return {"kind": self.kind, "chars": self.chars, **policy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        """Rebuild a tokenizer from :meth:`to_dict` output."""
        return cls(d["chars"], d.get("unknown", "error"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and (other.chars, other.unknown) == (self.chars, self.unknown)

    def __hash__(self) -> int:
        return hash((self.chars, self.unknown))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
    """One token per byte: 256 ids, text is encoded as UTF-8.

    Any byte sequence is representable, so nothing is ever unknown. Decoding
    uses ``errors="replace"`` because ids sampled from a model need not form
    valid UTF-8.
    """

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        """Always 256."""
        return 256

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def encode_array(self, data: str | bytes) -> np.ndarray:
        """Like :meth:`encode`, returning an int64 array; ``bytes`` are taken as they are."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text, invalid UTF-8 replaced by U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable state, inverse of :meth:`from_dict`."""
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteTokenizer:
        """Rebuild a tokenizer from :meth:`to_dict` output."""
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_CLASSES: dict[str, type[CharTokenizer] | type[ByteTokenizer]] = {
    CharTokenizer.kind: CharTokenizer,
    ByteTokenizer.kind: ByteTokenizer,
}
TOKENIZER_KINDS: tuple[str, ...] = tuple(_CLASSES)


def check_tokenizer_kind(kind: str) -> None:
    """Raise ``ValueError`` listing the valid kinds unless ``kind`` is one."""
    if kind not in _CLASSES:
        valid = ", ".join(TOKENIZER_KINDS)
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {valid}")


def tokenizer_from_dict(d: dict[str, Any]) -> CharTokenizer | ByteTokenizer:
    """Rebuild any tokenizer of this module from its ``to_dict()`` output."""
    kind = d.get("kind")
    check_tokenizer_kind(kind)
    return _CLASSES[kind].from_dict(d)


def build_tokenizer(kind: str, text: str) -> CharTokenizer | ByteTokenizer:
    """Create a tokenizer of ``kind`` ("char" or "byte") for ``text``.

    The char vocabulary is built from ``text``; the byte tokenizer ignores it.
    """
    check_tokenizer_kind(kind)
    if kind == CharTokenizer.kind:
        return CharTokenizer.from_text(text)
    return ByteTokenizer()
