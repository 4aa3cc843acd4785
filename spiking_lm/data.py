"""Text sources, a memory-mapped token cache and the Lightning DataModule.

A *source* string names where the training text comes from:

- ``"python-docs"``: the help topics shipped with Python (``pydoc_data``),
  about 0.46 MB of English, available offline everywhere.
- ``"tiny_shakespeare"``: ``$SPIKING_LM_DATA_DIR/tinyshakespeare.txt``,
  downloaded once if missing.
- a local text file, glob or directory, read through ``datasets``.
- ``"hf:NAME[:CONFIG]"``: a Hugging Face dataset, or a local one saved with
  ``save_to_disk`` or stored as parquet.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets
import lightning as L
import numpy as np
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from spiking_lm.files import write_atomic
from spiking_lm.tokenizers import (
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    check_tokenizer_kind,
    tokenizer_from_dict,
)

__all__ = [
    "TINY_SHAKESPEARE_URL",
    "TRAIN_SAMPLES",
    "TextDataModule",
    "cached_tokens",
    "data_dir",
    "default_cache_dir",
    "download_file",
    "load_bytes",
    "load_text",
    "unigram_entropy",
]

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
_TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"

# Training windows drawn when nothing bounds the epoch. Each window is a function
# of its index only, so the stream never needs to end: ``max_steps`` decides.
TRAIN_SAMPLES = 10**9

# Bumped whenever the layout of cached token files changes, so stale caches
# are ignored rather than misread.
_CACHE_FORMAT = 1

# What datasets/huggingface_hub raise when the Hub cannot be reached.
_NETWORK_ERRORS = (ConnectionError, TimeoutError, LocalEntryNotFoundError)


def data_dir() -> Path:
    """Folder of downloaded corpora: ``$SPIKING_LM_DATA_DIR``, else ``~/.cache/spiking_lm/data``."""
    env = os.environ.get("SPIKING_LM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spiking_lm" / "data"


def default_cache_dir() -> Path:
    """Folder holding token caches: ``$SPIKING_LM_CACHE_DIR`` or ``~/.cache/spiking_lm/tokens``."""
    env = os.environ.get("SPIKING_LM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spiking_lm" / "tokens"


def download_file(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically (no partial file is left on failure)."""

    def fetch(f: IO[bytes]) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f)

    write_atomic(dest, fetch)


# A piece of a corpus: where it came from (for error messages) and its
# content, as text or as the raw bytes of a file.
_Part = tuple[str, str | bytes]


@dataclass(frozen=True)
class _ResolvedSource:
    """A source string turned into a cache identity and a way to read it."""

    name: str
    identity: dict[str, Any]
    read: Callable[[], list[_Part]]


def _file_stats(files: Sequence[Path]) -> list[list[Any]]:
    """Path, size and mtime of each file: enough to notice edits for cache keys."""
    stats = [(f, f.stat()) for f in files]
    return [[str(f.resolve()), st.st_size, st.st_mtime_ns] for f, st in stats]


def _visible_files(directory: Path) -> list[Path]:
    """Files under ``directory``, recursively and sorted, except hidden ones (``.git``...)."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _resolve_python_docs() -> _ResolvedSource:
    import pydoc_data.topics

    def read() -> list[_Part]:
        topics = pydoc_data.topics.topics
        return [("python-docs", "\n".join(topics[key] for key in sorted(topics)))]

    stats = _file_stats([Path(pydoc_data.topics.__file__)])
    identity = {"kind": "python-docs", "python": sys.version, "file": stats}
    return _ResolvedSource("python-docs", identity, read)


def _resolve_tiny_shakespeare() -> _ResolvedSource:
    path = data_dir() / _TINY_SHAKESPEARE_FILE
    if not path.is_file():
        try:
            download_file(TINY_SHAKESPEARE_URL, path)
        except OSError as exc:
            raise FileNotFoundError(
                f"Tiny Shakespeare is not at {path} and downloading it from {TINY_SHAKESPEARE_URL}"
                f" failed ({exc}). Without network, copy the file to {path}"
                f" (or set SPIKING_LM_DATA_DIR to a folder holding {_TINY_SHAKESPEARE_FILE})."
            ) from exc
    return _ResolvedSource(
        str(path),
        {"kind": "tiny_shakespeare", "file": _file_stats([path])},
        lambda: [(str(path), path.read_bytes())],
    )


def _resolve_local(source: str) -> _ResolvedSource:
    expanded = os.path.expanduser(source)
    path = Path(expanded)
    # An existing path wins, so file names containing '[' need no escaping.
    if path.is_dir():
        files = _visible_files(path)
        if not files:
            raise ValueError(f"data source directory {path} contains no files")
    elif path.is_file():
        files = [path]
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no files match the data source pattern {expanded}")
    else:
        raise FileNotFoundError(
            f"data source {source!r} is neither 'python-docs', 'tiny_shakespeare' nor"
            f" 'hf:NAME[:CONFIG]', and there is no file or directory at {path}"
        )

    def read() -> list[_Part]:
        # datasets would report an unreadable file as a generic generation error.
        for f in files:
            try:
                with open(f, "rb"):
                    pass
            except PermissionError as exc:
                raise PermissionError(f"cannot read {f}: {exc.strerror}") from exc
        loaded = datasets.load_dataset(
            "text",
            data_files=[str(f) for f in files],
            split="train",
            sample_by="document",
            # latin-1 maps every byte to one code point, so the file's raw bytes
            # survive the trip through Arrow strings whatever their encoding;
            # UTF-8 validity is checked afterwards, per file, and only where
            # the char tokenizer needs it.
            encoding="latin-1",
        )
        texts = loaded["text"]
        return [(str(f), text.encode("latin-1")) for f, text in zip(files, texts, strict=True)]

    return _ResolvedSource(expanded, {"kind": "files", "files": _file_stats(files)}, read)


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file() or (
        path / datasets.config.DATASETDICT_JSON_FILENAME
    ).is_file()


def _open_hf_dataset(name: str, config: str | None) -> datasets.Dataset:
    """Load a dataset by Hub name or local path and pick its train (else first) split."""
    local = Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
    elif local.is_file() and local.suffix == ".parquet":
        loaded = datasets.load_dataset("parquet", data_files=str(local))
    else:
        try:
            loaded = datasets.load_dataset(name, config)
        except _NETWORK_ERRORS as exc:
            raise ConnectionError(
                f"cannot load the Hugging Face dataset {name!r}: no network access to the Hub"
                f" ({exc})."
                " Use a local path as data.source (a text file, glob or directory), or"
                " 'hf:PATH' with PATH a dataset saved with Dataset.save_to_disk or parquet files."
            ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        return loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _resolve_hf(source: str, text_column: str) -> _ResolvedSource:
    spec = source[len("hf:") :]
    # A local path may itself contain ':', so an existing path wins over NAME:CONFIG.
    if Path(spec).expanduser().exists():
        name, config = spec, None
    else:
        name, _, config_str = spec.partition(":")
        config = config_str or None
    if not name:
        raise ValueError(f"data source {source!r} names no dataset; expected 'hf:NAME[:CONFIG]'")
    local = Path(name).expanduser()
    if local.exists():
        files = _visible_files(local) if local.is_dir() else [local]
        identity = {
            "kind": "hf-local",
            "files": _file_stats(files),
            "config": config,
            "column": text_column,
        }
    else:
        # Hub datasets are identified by name alone: re-checking them would
        # need the network. Delete the cache entry to pick up a new revision.
        identity = {"kind": "hf", "name": name, "config": config, "column": text_column}

    def read() -> list[_Part]:
        ds = _open_hf_dataset(name, config)
        if text_column not in ds.column_names:
            raise ValueError(
                f"data source {source!r} has no column {text_column!r}; available columns:"
                f" {', '.join(ds.column_names)} (choose one with data.text_column)"
            )
        feature = ds.features[text_column]
        is_text = isinstance(feature, datasets.Value) and feature.dtype.endswith("string")
        if not is_text:
            raise ValueError(f"column {text_column!r} of {source!r} holds {feature}, not text")
        return [(source, "\n".join(row for row in ds[text_column] if row))]

    return _ResolvedSource(source, identity, read)


def _resolve(source: str, text_column: str) -> _ResolvedSource:
    if source == "python-docs":
        return _resolve_python_docs()
    if source == "tiny_shakespeare":
        return _resolve_tiny_shakespeare()
    if source.startswith("hf:"):
        return _resolve_hf(source, text_column)
    return _resolve_local(source)


def _as_text(origin: str, content: str | bytes) -> str:
    if isinstance(content, str):
        return content
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{origin} is not valid UTF-8 (byte 0x{content[exc.start]:02x} at offset {exc.start});"
            " the char tokenizer needs UTF-8 text, use tokenizer='byte' to train on raw bytes"
        ) from exc


def _read(resolved: _ResolvedSource, as_bytes: bool) -> str | bytes:
    parts = resolved.read()
    if as_bytes:
        data: str | bytes = b"".join(
            c if isinstance(c, bytes) else c.encode("utf-8") for _, c in parts
        )
    else:
        data = "".join(_as_text(origin, c) for origin, c in parts)
    if not data:
        raise ValueError(f"data source {resolved.name} contains no text")
    return data


def load_text(source: str, text_column: str = "text") -> str:
    """Return the whole text of ``source`` (see the module docstring for the forms).

    Several files are concatenated in sorted path order, as ``cat`` would;
    rows of a Hugging Face dataset and Python help topics are joined with
    newlines. Local files go through ``datasets``' text loader, which turns
    ``\\r\\n`` and ``\\r`` line ends into ``\\n``.

    Args:
        source: ``"python-docs"``, ``"tiny_shakespeare"``, a path, glob or
            directory, or ``"hf:NAME[:CONFIG]"``.
        text_column: Column holding the text, for ``hf:`` sources.

    Raises:
        FileNotFoundError: A local path does not exist, or Tiny Shakespeare
            is missing and cannot be downloaded.
        ValueError: The source holds no text, a file is not valid UTF-8, or
            ``text_column`` is missing.
        ConnectionError: An ``hf:`` dataset needs the Hub and there is no network.
    """
    return _read(_resolve(source, text_column), as_bytes=False)


def load_bytes(source: str, text_column: str = "text") -> bytes:
    """Like :func:`load_text`, but as bytes: files as stored, other text as UTF-8.

    Unlike :func:`load_text` this accepts files that are not valid UTF-8.
    """
    return _read(_resolve(source, text_column), as_bytes=True)


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
    resolved = _resolve(source, text_column)
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

    # The metadata is written last, so its presence marks a complete entry.
    if not (meta_path.is_file() and tokens_path.is_file()):
        if kind == ByteTokenizer.kind:
            tok: Tokenizer = ByteTokenizer()
            ids = tok.encode_array(_read(resolved, as_bytes=True))
        else:
            text = _read(resolved, as_bytes=False)
            tok = fixed if fixed is not None else build_tokenizer(kind, text)
            try:
                ids = tok.encode_array(text)
            except ValueError as exc:
                raise ValueError(f"cannot tokenize {resolved.name}: {exc}") from exc
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        write_atomic(tokens_path, lambda f: np.save(f, ids.astype(dtype)))
        meta = {"source": resolved.name, "num_tokens": len(ids), "tokenizer": tok.to_dict()}
        write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))

    tok = tokenizer_from_dict(json.loads(meta_path.read_text())["tokenizer"])
    return np.load(tokens_path, mmap_mode="r"), tok


def unigram_entropy(tokens: np.ndarray | Sequence[int]) -> float:
    """Entropy in nats of the token frequencies of ``tokens``.

    A model that ignores context cannot beat this cross-entropy, so it is the
    first bar a language model's loss should pass.
    """
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class _Windows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``block_size + 1`` tokens from ``[start, stop)`` of a cached token file."""

    def __init__(self, tokens: np.memmap, start: int, stop: int, block_size: int) -> None:
        self._filename = tokens.filename
        self._start, self._stop = start, stop
        self.block_size = block_size
        self._tokens: np.ndarray | None = tokens[start:stop]

    @property
    def max_offset(self) -> int:
        """Last start position at which a whole window fits."""
        return self._stop - self._start - self.block_size - 1

    def _window(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.load(self._filename, mmap_mode="r")[self._start : self._stop]
        window = self._tokens[offset : offset + self.block_size + 1]
        window = torch.from_numpy(window.astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies the whole array; DataLoader workers started
        # by spawn/forkserver re-open the file instead.
        return {**self.__dict__, "_tokens": None}


class _TrainBatches(_Windows, IterableDataset):
    """Endless random training batches, each a function of its global batch index alone.

    Global batch ``g`` holds samples ``g*B .. g*B + B-1``, and sample ``i``'s
    window comes from a generator seeded with ``(seed, i)``. Rank ``r`` of
    ``W`` processes takes global batches ``n*W + r`` for its local batches
    ``n = first_batch, first_batch + 1, ...``, and DataLoader workers take
    those in turn, so what a step sees never depends on the number of workers,
    on what was drawn before, or on whether the run was resumed.
    """

    def __init__(
        self,
        tokens: np.memmap,
        start: int,
        stop: int,
        block_size: int,
        batch_size: int,
        seed: int,
        first_batch: int,
        num_batches: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(tokens, start, stop, block_size)
        self.batch_size, self.seed = batch_size, seed
        self.first_batch, self.num_batches = first_batch, num_batches
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.num_batches

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        return self._window(int(rng.integers(self.max_offset + 1)))

    def batch(self, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = global_batch * self.batch_size
        xs, ys = zip(*(self.sample(first + j) for j in range(self.batch_size)), strict=True)
        return torch.stack(xs), torch.stack(ys)  # (B, L), (B, L)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        for local in itertools.count(self.first_batch + worker_id, workers):
            yield self.batch(local * self.world_size + self.rank)


class _ValWindows(_Windows):
    """``count`` evenly spaced windows covering the split from end to end."""

    def __init__(
        self, tokens: np.memmap, start: int, stop: int, block_size: int, count: int
    ) -> None:
        super().__init__(tokens, start, stop, block_size)
        self._offsets = np.linspace(0, self.max_offset, count).round().astype(np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window(int(self._offsets[index]))


class TextDataModule(L.LightningDataModule):
    """Next-token windows over one text source, tokenized once and memory-mapped.

    The first ``1 - val_fraction`` of the tokens is the training split, the
    rest the validation split; windows never cross the boundary. The char
    vocabulary is built from the full text before the split, so validation
    holds no character the model cannot represent.

    Training batches are random but fixed by ``seed`` and their global index,
    shared out between DDP ranks, and ``train_dataloader()`` starts after the
    batches a restored trainer has already consumed. Lightning restarts a
    dataloader from its first batch on resume, so this is what makes a resumed
    run see the same batches as an uninterrupted one.

    The tokenizer is part of ``state_dict()``, so checkpoints carry the
    vocabulary; after ``load_state_dict()`` the text is tokenized with the
    checkpoint's vocabulary.

    Args:
        source: Text source: "python-docs", "tiny_shakespeare", a local text
            file, glob or directory, or "hf:NAME[:CONFIG]" (Hub name, or path
            to a save_to_disk dataset or parquet files).
        tokenizer: "char" (vocabulary from the text; unknown characters are
            an error) or "byte" (256 UTF-8 byte values, any file accepted).
        block_size: Tokens per training example (context length).
        batch_size: Windows per batch.
        val_fraction: Fraction of the tokens, taken from the end, held out
            for validation; strictly between 0 and 1.
        text_column: Column holding the text, for "hf:" sources.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_batches: Batches per validation pass; the val_batches * batch_size
            windows are evenly spaced over the split and the same every pass.
        seed: Seed of the training windows.
        cache_dir: Folder for token caches; default $SPIKING_LM_CACHE_DIR,
            else ~/.cache/spiking_lm/tokens.
    """

    def __init__(
        self,
        source: str = "python-docs",
        tokenizer: str = "char",
        block_size: int = 64,
        batch_size: int = 12,
        val_fraction: float = 0.1,
        text_column: str = "text",
        num_workers: int = 0,
        val_batches: int = 20,
        seed: int = 1337,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
        for name, value, minimum in (
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("val_batches", val_batches, 1),
            ("num_workers", num_workers, 0),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}")
        check_tokenizer_kind(tokenizer)
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None
        self.tokens: np.memmap | None = None
        self.num_train_tokens = 0
        self._checkpoint_tokenizer: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load (or build) the token cache and the tokenizer; later calls are no-ops."""
        if self.tokens is None:
            self._load_tokens()

    def _load_tokens(self) -> None:
        hp = self.hparams
        tokens, tok = cached_tokens(
            hp.source,
            self._checkpoint_tokenizer or hp.tokenizer,
            text_column=hp.text_column,
            cache_dir=hp.cache_dir,
        )
        num_train = int(len(tokens) * (1.0 - hp.val_fraction))
        for split, length in (("training", num_train), ("validation", len(tokens) - num_train)):
            if length < hp.block_size + 1:
                raise ValueError(
                    f"block_size={hp.block_size} needs windows of {hp.block_size + 1} tokens,"
                    f" but the {split} split of {hp.source!r} has only {length} tokens"
                    f" ({len(tokens)} in all, val_fraction={hp.val_fraction})"
                )
        self.tokens, self.tokenizer = tokens, tok
        self.num_train_tokens = num_train

    @property
    def vocab_size(self) -> int:
        """Symbols in the vocabulary; reads (or builds) the token cache on first use."""
        self.setup()
        return self.tokenizer.vocab_size

    @property
    def train_tokens(self) -> np.ndarray:
        """Tokens of the training split (memory-mapped)."""
        return self._require_tokens()[: self.num_train_tokens]

    @property
    def val_tokens(self) -> np.ndarray:
        """Tokens of the validation split (memory-mapped)."""
        return self._require_tokens()[self.num_train_tokens :]

    def _require_tokens(self) -> np.memmap:
        if self.tokens is None:
            raise RuntimeError("call setup() first")
        return self.tokens

    def train_dataloader(self) -> DataLoader:
        """Random batches, continuing after those a restored trainer has consumed.

        The epoch lasts the trainer's ``max_steps`` (so progress bars know the
        total); without a trainer or a step limit it is practically endless.
        """
        hp = self.hparams
        trainer = self.trainer
        if trainer is None:
            first, total, rank, world = 0, TRAIN_SAMPLES // hp.batch_size, 0, 1
        else:
            accumulate = trainer.accumulate_grad_batches
            first = trainer.global_step * accumulate
            steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            total = steps * accumulate if steps else TRAIN_SAMPLES // hp.batch_size
            rank, world = trainer.global_rank, trainer.world_size
        dataset = _TrainBatches(
            self._require_tokens(), 0, self.num_train_tokens, hp.block_size, hp.batch_size,
            hp.seed, first, total, rank, world,
        )
        return self._loader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The same ``val_batches * batch_size`` evenly spaced windows every time."""
        hp = self.hparams
        tokens = self._require_tokens()
        count = hp.val_batches * hp.batch_size
        dataset = _ValWindows(tokens, self.num_train_tokens, len(tokens), hp.block_size, count)
        return self._loader(dataset, batch_size=hp.batch_size)

    def test_dataloader(self) -> DataLoader:
        """The validation windows: sources have no third split, so ``test`` re-scores held-out text."""
        return self.val_dataloader()

    def _loader(self, dataset: _Windows, batch_size: int | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer, so a checkpoint keeps the vocabulary its model was trained with."""
        if self.tokenizer is not None:
            return {"tokenizer": self.tokenizer.to_dict()}
        if self._checkpoint_tokenizer is not None:
            return {"tokenizer": self._checkpoint_tokenizer}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's tokenizer, re-tokenizing if ``setup()`` built a different one.

        Lightning restores the datamodule after calling ``setup()``; re-tokenizing
        keeps the token ids consistent with the restored model's embedding.
        """
        saved = state_dict.get("tokenizer")
        if saved is None:
            return
        restored = tokenizer_from_dict(saved)
        if restored.kind != self.hparams.tokenizer:
            raise ValueError(
                f"the checkpoint was trained with the {restored.kind!r} tokenizer but"
                f" data.tokenizer is {self.hparams.tokenizer!r}"
            )
        self._checkpoint_tokenizer = restored.to_dict()
        if self.tokenizer is not None and self.tokenizer != restored:
            self._load_tokens()
