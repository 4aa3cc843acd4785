"""The token cache: each (source, tokenizer) pair tokenized once and stored as a memory-mapped ``.npy`` file."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spiking_lm.data.sources import read_source, resolve
from spiking_lm.files import remove_stale_parts, write_atomic
from spiking_lm.tokenizers import (
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    check_tokenizer_kind,
    tokenizer_from_dict,
)

# Bumped whenever the layout of cached token files changes, so stale caches
# are ignored rather than misread.
_CACHE_FORMAT = 1

def default_cache_dir() -> Path:
    """Folder holding token caches: ``$SPIKING_LM_CACHE_DIR`` or ``~/.cache/spiking_lm/tokens``."""
    env = os.environ.get("SPIKING_LM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spiking_lm" / "tokens"


def cached_tokens(
    source: str,
    tokenizer: str | dict[str, Any] = "char",
    *,
    text_column: str = "text",
    cache_dir: str | Path | None = None,
) -> tuple[np.memmap, Tokenizer]:
    """Tokenize ``source`` once and return the tokens memory-mapped, with the tokenizer.

    The cache entry is keyed by the source's identity (including file sizes
    and mtimes, so edited files are re-read) and by ``tokenizer``. Given a
    kind, the char vocabulary is built from the whole text and stored beside
    the tokens, so later calls neither read nor tokenize the text. Given a
    tokenizer dict (e.g. from a checkpoint) the text is tokenized with exactly
    that vocabulary.

    Args:
        source: See :func:`load_text`.
        tokenizer: A kind ("char" or "byte") or a ``to_dict()`` of a tokenizer.
        text_column: Column holding the text, for ``hf:`` sources.
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.

    Returns:
        Read-only uint16 tokens (uint32 for vocabularies beyond 65536), and the tokenizer.
    """
    fixed = tokenizer_from_dict(tokenizer) if isinstance(tokenizer, dict) else None
    kind = fixed.kind if fixed is not None else tokenizer
    check_tokenizer_kind(kind)
    resolved = resolve(source, text_column)
    key_blob = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "source": resolved.identity,
            "tokenizer": fixed.to_dict() if fixed is not None else {"kind": kind},
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_blob.encode()).hexdigest()[:32]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tokens_path, meta_path = root / f"{key}.npy", root / f"{key}.json"

    remove_stale_parts(root)
    entry = _open_entry(tokens_path, meta_path)
    if entry is None:
        if kind == ByteTokenizer.kind:
            tok: Tokenizer = ByteTokenizer()
            ids = tok.encode_array(read_source(resolved, as_bytes=True))
        else:
            text = read_source(resolved, as_bytes=False)
            tok = fixed if fixed is not None else build_tokenizer(kind, text)
            try:
                ids = tok.encode_array(text)
            except ValueError as exc:
                raise ValueError(f"cannot tokenize {resolved.name}: {exc}") from exc
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        write_atomic(tokens_path, lambda f: np.save(f, ids.astype(dtype)))
        meta = {"source": resolved.name, "num_tokens": len(ids), "tokenizer": tok.to_dict()}
        write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        entry = np.load(tokens_path, mmap_mode="r"), tok
    return entry


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
        return tokens, tokenizer_from_dict(meta["tokenizer"])
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
