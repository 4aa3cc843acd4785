"""Tokenizers whose whole state is a JSON dict: characters, bytes, and subwords through Hugging Face ``tokenizers``.

The dict form (``to_dict()``) is what goes into checkpoints and exports, so a
trained model can always be paired with the exact vocabulary it was trained on.
A *tokenizer spec* (``data.tokenizer``) names where a tokenizer comes from:
``"char"`` or ``"byte"``, ``"bpe"`` (a byte-level BPE trained on the data), a
path to a ``tokenizer.json`` (or a folder holding one), or a Hub name such as
``"gpt2"``. Every tokenizer of the last three is a :class:`SubwordTokenizer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tokenizers as hf
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

__all__ = [
    "BPE_MIN_VOCAB",
    "TOKENIZER_KINDS",
    "UNKNOWN_POLICIES",
    "ByteTokenizer",
    "CharTokenizer",
    "SubwordTokenizer",
    "Tokenizer",
    "UnknownCharacters",
    "build_tokenizer",
    "check_bpe_vocab_size",
    "check_tokenizer_kind",
    "check_tokenizer_spec",
    "load_subword",
    "spec_kind",
    "tokenizer_from_dict",
    "train_bpe",
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

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def _unknown_error(unknown: set[str]) -> UnknownCharacters:
    shown = ", ".join(repr(c) for c in sorted(unknown)[:20])
    more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
    return UnknownCharacters(f"{len(unknown)} character(s) not in the char tokenizer vocabulary: {shown}{more}")


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
            raise ValueError(
                f"unknown characters: {unknown!r} is neither one of {', '.join(UNKNOWN_POLICIES)}"
                " nor a character of the vocabulary to map them to"
            )
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
        raise _unknown_error({chr(c) for c in codes[~known].tolist()})

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        """:meth:`encode_array` of each chunk of a text; unknown characters are named over the whole text."""
        chunks = iter(chunks)
        for chunk in chunks:
            try:
                yield self.encode_array(chunk)
            except UnknownCharacters:
                # Read on, so the error names every offending character, as encoding the whole text at once would.
                unknown = set()
                for rest in (chunk, *chunks):
                    codes, _, known = self._lookup(rest)
                    unknown.update(chr(c) for c in np.unique(codes[~known]).tolist())
                raise _unknown_error(unknown) from None

    @staticmethod
    def vocabulary(chunks: Iterable[str]) -> str:
        """The sorted characters of a text given in chunks: the vocabulary :meth:`from_text` would build."""
        seen: set[int] = set()
        for chunk in chunks:
            seen.update(np.unique(np.frombuffer(chunk.encode("utf-32-le", errors="surrogatepass"), np.uint32)).tolist())
        return "".join(chr(c) for c in sorted(seen))

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

    def encode_chunks(self, chunks: Iterable[str | bytes]) -> Iterator[np.ndarray]:
        """:meth:`encode_array` of each chunk: bytes split anywhere encode the same."""
        return map(self.encode_array, chunks)

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


# The end of a word before a space or a line end: byte-level BPE (the GPT-2 pre-tokenizer) never merges across it,
# so a text cut there encodes to the same tokens as the whole text. (Not any line start: the pre-tokenizer splits a
# run of whitespace by what follows it.)
_PIECE_BOUNDARY = re.compile(r"(?<=\S)(?=[ \n])")
# Characters per sequence handed to the Rust batch encoder, which spreads a batch over its threads.
_PIECE_CHARS = 1 << 16
# A text without such a word end for this long is cut wherever it has grown to.
_MAX_CARRY_CHARS = 1 << 24
# A byte-level BPE starts from the 256 byte symbols.
BPE_MIN_VOCAB = 256


def _last_boundary(text: str) -> int:
    """Position of the last piece boundary of ``text``, or 0 where it has none."""
    for i in range(len(text) - 1, 0, -1):
        if text[i] in " \n" and not text[i - 1].isspace():
            return i
    return 0


def _pieces(text: str) -> list[str]:
    """``text`` cut at piece boundaries into pieces of at least ``_PIECE_CHARS`` characters (but the last)."""
    pieces, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        match = _PIECE_BOUNDARY.search(text, start + _PIECE_CHARS)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


class SubwordTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer: a BPE trained here, a ``tokenizer.json``, or one from the Hub.

    Its state is the tokenizer's own JSON (what ``tokenizer.json`` holds), kept as it was given, so a
    checkpoint's tokenizer compares equal to the one it was saved from. Encoding adds no special tokens:
    the model sees the text's tokens only.

    Args:
        state: The parsed ``tokenizer.json``.
        name: Where it came from, for messages: ``"bpe"``, a path or a Hub name.
    """

    kind = "subword"

    def __init__(self, state: dict[str, Any], name: str) -> None:
        self.state, self.name = state, name
        self._tok = hf.Tokenizer.from_str(json.dumps(state))
        self._dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    @classmethod
    def from_hf(cls, tok: hf.Tokenizer, name: str) -> SubwordTokenizer:
        """Wrap an in-memory ``tokenizers.Tokenizer``."""
        return cls(json.loads(tok.to_str()), name)

    @property
    def vocab_size(self) -> int:
        """Tokens of the vocabulary, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, returning an int64 array; a long text is batch-encoded in pieces."""
        return np.concatenate([*self._encode_pieces(_pieces(text)), np.zeros(0, np.int64)]).astype(np.int64)

    def _encode_pieces(self, pieces: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(pieces, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self._dtype) for e in encodings]

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        """Tokens of a text given in chunks, batch-encoded: the tokens of the whole text, for byte-level BPE.

        Each chunk is cut at its last word end (before a space or a line end), the rest carried into the
        next, since a BPE must not see a word split by a chunk's end. (Tokenizers whose pre-tokenizer does
        not split there, unlike byte-level BPE, see each piece as a separate sequence.)
        """
        carry = ""
        for chunk in chunks:
            text = carry + chunk
            cut = _last_boundary(text)
            if cut == 0 and len(text) > _MAX_CARRY_CHARS:
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield np.concatenate(self._encode_pieces(_pieces(text[:cut])))
        if carry:
            yield np.concatenate(self._encode_pieces(_pieces(carry)))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; bytes that do not form valid UTF-8 become U+FFFD."""
        return self._tok.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable state, inverse of :meth:`from_dict`."""
        return {"kind": self.kind, "name": self.name, "tokenizer": self.state}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SubwordTokenizer:
        """Rebuild a tokenizer from :meth:`to_dict` output."""
        state = d["tokenizer"]
        try:
            return cls(state, d.get("name", cls.kind))
        except Exception as exc:  # the Rust side raises plain Exception for a malformed tokenizer
            raise ValueError(f"the subword tokenizer's state is not a valid tokenizer.json: {exc}") from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and other.state == self.state

    def __hash__(self) -> int:
        return hash(self.vocab_size)

    def __repr__(self) -> str:
        return f"SubwordTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Refuse a BPE vocabulary smaller than the byte alphabet it starts from."""
    if vocab_size < BPE_MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {BPE_MIN_VOCAB} (the byte alphabet) for bpe, got {vocab_size}")


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> SubwordTokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on a text given in chunks, streamed (never held whole).

    Byte-level, as GPT-2's: every text is representable, so nothing is ever unknown. The trainer keeps
    only the counts of distinct words, and shows its progress through the merges.

    Args:
        texts: The training text, in chunks.
        vocab_size: Tokens of the result (at least 256, the byte alphabet); a text with fewer distinct
            merges gives fewer.
        length: Number of chunks, for the trainer's progress bar.
    """
    check_bpe_vocab_size(vocab_size)
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=True
    )
    # Fed in pieces: the trainer's memory grows with the length of the strings it is given, not with the text.
    tok.train_from_iterator((_pieces(text) for text in texts), trainer, length=length)
    return SubwordTokenizer.from_hf(tok, "bpe")


def load_subword(spec: str) -> SubwordTokenizer:
    """The tokenizer of a ``tokenizer.json`` file, of a folder holding one, or of a Hub model (e.g. ``"gpt2"``).

    A Hub tokenizer is downloaded once into the Hugging Face cache; offline (``HF_HUB_OFFLINE=1``, or no
    network) only a cached one loads.

    Raises:
        FileNotFoundError: ``spec`` names a ``.json`` file or a folder without ``tokenizer.json``.
        ConnectionError: ``spec`` is a Hub name and the Hub cannot be reached (nor the file found in the cache).
        ValueError: The file is not a ``tokenizer.json``, or the Hub model has none.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer folder {path.parent} holds no tokenizer.json")
    elif not path.is_file():
        if spec.endswith(".json"):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        path = Path(_download(spec))
    try:
        return SubwordTokenizer(json.loads(path.read_text(encoding="utf-8")), spec)
    except OSError:
        raise
    except Exception as exc:  # bad UTF-8 or JSON, or the Rust side's plain Exception for a malformed tokenizer
        raise ValueError(f"{path} is not a tokenizer.json of the Hugging Face tokenizers library: {exc}") from exc


def _download(name: str) -> str:
    """Path of the Hub model ``name``'s tokenizer.json, downloaded or from the Hugging Face cache."""
    try:
        return hf_hub_download(name, "tokenizer.json")
    except LocalEntryNotFoundError as exc:  # offline or unreachable, and not in the cache
        raise ConnectionError(
            f"cannot load the tokenizer {name!r}: it is not char, byte or bpe, no file is at {name!r}, and the"
            f" Hugging Face Hub cannot be reached to download it (nor is it in the local cache). Give a path to a"
            f" tokenizer.json, train one with data.tokenizer=bpe, or load {name!r} once with network access."
        ) from exc
    except EntryNotFoundError as exc:
        raise ValueError(f"the Hub model {name!r} has no tokenizer.json: {exc}") from exc
    except (HfHubHTTPError, ValueError) as exc:  # no such repository, or a malformed name
        raise ValueError(f"cannot load the tokenizer {name!r} from the Hugging Face Hub: {exc}") from exc


_CLASSES: dict[str, type[CharTokenizer] | type[ByteTokenizer] | type[SubwordTokenizer]] = {
    CharTokenizer.kind: CharTokenizer,
    ByteTokenizer.kind: ByteTokenizer,
    SubwordTokenizer.kind: SubwordTokenizer,
}
TOKENIZER_KINDS: tuple[str, ...] = tuple(_CLASSES)


def check_tokenizer_kind(kind: str) -> None:
    """Raise ``ValueError`` listing the valid kinds unless ``kind`` is one."""
    if kind not in _CLASSES:
        valid = ", ".join(TOKENIZER_KINDS)
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {valid}")


def spec_kind(spec: str) -> str:
    """The kind of tokenizer a spec gives: ``"char"``, ``"byte"``, or ``"subword"`` for everything else."""
    return spec if spec in (CharTokenizer.kind, ByteTokenizer.kind) else SubwordTokenizer.kind


def check_tokenizer_spec(spec: str) -> None:
    """Refuse what cannot name a tokenizer, before any data is read: a blank spec, a missing ``.json`` file."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"data.tokenizer is empty ({spec!r}): give char, byte, bpe, a tokenizer.json or a Hub name such as gpt2"
        )
    if spec.endswith(".json") and not Path(spec).expanduser().is_file():
        raise FileNotFoundError(f"tokenizer file {Path(spec).expanduser()} does not exist")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild any tokenizer of this module from its ``to_dict()`` output."""
    kind = d.get("kind")
    check_tokenizer_kind(kind)
    return _CLASSES[kind].from_dict(d)


def build_tokenizer(kind: str, text: str) -> CharTokenizer | ByteTokenizer:
    """Create a tokenizer of ``kind`` ("char" or "byte") for ``text``.

    The char vocabulary is built from ``text``; the byte tokenizer ignores it.
    """
    if kind not in (CharTokenizer.kind, ByteTokenizer.kind):
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: char, byte")
    if kind == CharTokenizer.kind:
        return CharTokenizer.from_text(text)
    return ByteTokenizer()
