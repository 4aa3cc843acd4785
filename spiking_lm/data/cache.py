"""The token cache: each (source, tokenizer) pair tokenized once and stored as a memory-mapped ``.npy`` file.

A source is streamed through its tokenizer in bounded chunks and its tokens appended to the file, so neither
its text nor its tokens are ever held in memory whole; peak memory stays the same whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from spiking_lm.data.sources import ResolvedSource, byte_chunks, resolve, source_size, text_chunks
from spiking_lm.files import remove_stale_parts, write_atomic
from spiking_lm.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SubwordTokenizer,
    Tokenizer,
    check_tokenizer_spec,
    load_subword,
    tokenizer_from_dict,
    train_bpe,
)

# Bumped whenever the layout of cached token files changes, so stale caches
# are ignored rather than misread.
_CACHE_FORMAT = 1
BPE = "bpe"


def default_cache_dir() -> Path:
    """Folder holding token caches: ``$SPIKING_LM_CACHE_DIR`` or ``~/.cache/spiking_lm/tokens``."""
    env = os.environ.get("SPIKING_LM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spiking_lm" / "tokens"


def cached_tokens(
    source: str,
    tokenizer: str | dict[str, Any] = "char",
    *,
    text_column: str = "text",
    vocab_size: int = 4096,
    train_fraction: float = 0.9,
    cache_dir: str | Path | None = None,
) -> tuple[np.memmap, Tokenizer]:
    """Tokenize ``source`` once and return the tokens memory-mapped, with the tokenizer.

    The cache entry is keyed by the source's identity (including file sizes
    and mtimes, so edited files are re-read) and by ``tokenizer``. A char
    vocabulary or a BPE is built from the text and stored beside the tokens,
    so later calls neither read nor tokenize the text. Given a tokenizer dict
    (e.g. from a checkpoint), a ``tokenizer.json`` or a Hub name, the text is
    tokenized with exactly that tokenizer.

    The source is streamed in chunks (twice where a vocabulary is built
    first); the tokens go to a temporary file renamed into place when
    complete, then the metadata, so a killed run leaves no entry taken for
    complete.

    Args:
        source: See :func:`load_text`.
        tokenizer: A spec ("char", "byte", "bpe", a tokenizer.json or a Hub
            name; see :mod:`spiking_lm.tokenizers`) or a ``to_dict()`` of a tokenizer.
        text_column: Column holding the text, for ``hf:`` sources.
        vocab_size: Tokens of a BPE trained here ("bpe" only).
        train_fraction: Leading fraction of the text a BPE is trained on, the
            training split ("bpe" only).
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.

    Returns:
        Read-only uint16 tokens (uint32 for vocabularies beyond 65536), and the tokenizer.
    """
    if isinstance(tokenizer, dict):
        fixed: Tokenizer | None = tokenizer_from_dict(tokenizer)
        spec = fixed.kind
    else:
        check_tokenizer_spec(tokenizer)
        spec = tokenizer
        if spec == SubwordTokenizer.kind:
            raise ValueError(
                "data.tokenizer 'subword' is the kind a checkpoint records, not a tokenizer to build; give bpe,"
                " a tokenizer.json or a Hub name"
            )
        built_here = (CharTokenizer.kind, ByteTokenizer.kind, BPE)
        fixed = None if spec in built_here else load_subword(spec)
    resolved = resolve(source, text_column)
    if fixed is not None:
        key_tokenizer = fixed.to_dict()
    elif spec == BPE:
        key_tokenizer = {"kind": BPE, "vocab_size": vocab_size, "train_fraction": train_fraction}
    else:  # as before BPE existed, so existing caches stay valid
        key_tokenizer = {"kind": spec}
    key_blob = json.dumps(
        {"format": _CACHE_FORMAT, "source": resolved.identity, "tokenizer": key_tokenizer},
        sort_keys=True,
    )
    key = hashlib.sha256(key_blob.encode()).hexdigest()[:32]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tokens_path, meta_path = root / f"{key}.npy", root / f"{key}.json"

    remove_stale_parts(root)
    entry = _open_entry(tokens_path, meta_path)
    if entry is None:
        tok = fixed or _build(spec, resolved, vocab_size, train_fraction)
        num_tokens = _write_tokens(tokens_path, tok, resolved)
        meta = {"source": resolved.name, "num_tokens": num_tokens, "tokenizer": tok.to_dict()}
        write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        entry = np.load(tokens_path, mmap_mode="r"), tok
    return entry


def _progress(chunks: Iterable[str | bytes], desc: str, total: int | None) -> Iterator[str | bytes]:
    """Pass ``chunks`` through, showing how much of the source has gone by (on a terminal: not in a log)."""
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False, disable=None) as bar:
        for chunk in chunks:
            bar.update(len(chunk))
            yield chunk


def _build(spec: str, resolved: ResolvedSource, vocab_size: int, train_fraction: float) -> Tokenizer:
    """The tokenizer ``spec`` builds from the text of ``resolved``: a char vocabulary, a BPE, or bytes."""
    if spec == ByteTokenizer.kind:
        return ByteTokenizer()
    if spec == CharTokenizer.kind:
        chunks = _progress(text_chunks(resolved), f"vocabulary of {resolved.name}", resolved.size)
        chars = CharTokenizer.vocabulary(chunks)
        if not chars:
            raise ValueError(f"data source {resolved.name} contains no text")
        return CharTokenizer(chars)
    # The BPE sees the training split only: the leading train_fraction of the text, measured before tokenizing.
    limit = int(source_size(resolved) * train_fraction)
    if limit == 0:
        raise ValueError(f"data source {resolved.name} contains no text")
    return train_bpe(_progress(text_chunks(resolved, limit), f"train BPE on {resolved.name}", limit), vocab_size)


def _write_tokens(path: Path, tok: Tokenizer, resolved: ResolvedSource) -> int:
    """Stream the source through ``tok`` into the ``.npy`` file ``path``, atomically; return the token count."""
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    chunks = byte_chunks(resolved) if tok.kind == ByteTokenizer.kind else text_chunks(resolved)
    chunks = _progress(chunks, f"tokenize {resolved.name}", resolved.size)
    count = 0

    def write(f: IO[bytes]) -> None:
        nonlocal count
        # The header's shape is written last, when the count is known; it always takes the same 128 bytes.
        _write_header(f, dtype, 0)
        try:
            for ids in tok.encode_chunks(chunks):
                f.write(ids.astype(dtype, copy=False).tobytes())
                count += len(ids)
        except ValueError as exc:
            raise ValueError(f"cannot tokenize {resolved.name}: {exc}") from exc
        if count == 0:
            raise ValueError(f"data source {resolved.name} contains no text")
        f.seek(0)
        _write_header(f, dtype, count)

    write_atomic(path, write)
    return count


_HEADER_BYTES = 128


def _write_header(f: IO[bytes], dtype: np.dtype, count: int) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": dtype.str, "fortran_order": False, "shape": (count,)})
    if f.tell() != _HEADER_BYTES:  # numpy pads the header to 64-byte blocks; a 1-D shape fits in two
        raise RuntimeError(f"unexpected .npy header length {f.tell()}")


def _open_entry(tokens_path: Path, meta_path: Path) -> tuple[np.memmap, Tokenizer] | None:
    """The cached tokens and tokenizer, or None to (re)build them.

    The metadata is written last, so without it the entry is incomplete. Both files are written atomically,
    yet a disk that filled up, a copy cut short or a hand edit can still damage one: such an entry is
    reported on stderr and rebuilt rather than misread.
    """
    if not (meta_path.is_file() and tokens_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(tokens_path, mmap_mode="r")
        if tokens.shape != (meta["num_tokens"],):
            raise ValueError(f"it holds {tokens.shape} tokens where its metadata says {meta['num_tokens']}")
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        # An id past the vocabulary would index past the model's embedding (an IndexError mid-training).
        largest = int(tokens.max()) if len(tokens) else -1
        if largest >= tokenizer.vocab_size:
            raise ValueError(f"it holds token id {largest}, past its vocabulary of {tokenizer.vocab_size}")
        return tokens, tokenizer
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        print(f"spiking-lm: the token cache {tokens_path} is damaged ({exc}); rebuilding it", file=sys.stderr)
        return None


def unigram_entropy(tokens: np.ndarray | Sequence[int]) -> float:
    """Entropy in nats of the token frequencies of ``tokens``.

    A model that ignores context cannot beat this cross-entropy, so it is the
    first bar a language model's loss should pass.
    """
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
