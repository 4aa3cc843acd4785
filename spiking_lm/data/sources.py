"""Text sources: a source string resolved to a cache identity and a way to stream its text in bounded chunks.

A *source* string names where the training text comes from:

- ``"python-docs"``: the help topics shipped with Python (``pydoc_data``),
  about 0.46 MB of English, available offline everywhere.
- ``"tiny_shakespeare"``: ``$SPIKING_LM_DATA_DIR/tinyshakespeare.txt``,
  downloaded once if missing.
- a local text file, glob or directory, read through ``datasets``.
- ``"hf:NAME[:CONFIG]"``: a Hugging Face dataset, or a local one saved with
  ``save_to_disk`` or stored as parquet.

Every source is read as a stream of chunks of at most ``CHUNK`` bytes or
characters (rows of a dataset: a batch of rows), so a corpus larger than memory
can be tokenized.
"""

from __future__ import annotations

import codecs
import glob
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
from huggingface_hub.errors import LocalEntryNotFoundError

from spiking_lm.files import write_atomic

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"

# What datasets/huggingface_hub raise when the Hub cannot be reached.
_NETWORK_ERRORS = (ConnectionError, TimeoutError, LocalEntryNotFoundError)


def data_dir() -> Path:
    """Folder of downloaded corpora: ``$SPIKING_LM_DATA_DIR``, else ``~/.cache/spiking_lm/data``."""
    env = os.environ.get("SPIKING_LM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spiking_lm" / "data"


def download_file(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically (no partial file is left on failure)."""

    def fetch(f: IO[bytes]) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f)

    write_atomic(dest, fetch)


# Bytes (of a file) or characters (of other text) read at a time: large enough for the tokenizers' batch
# encoders, small enough that a few chunks in flight stay far below a gigabyte.
CHUNK = 1 << 22
# Rows of a dataset read at a time.
_ROWS = 1024

# A piece of a corpus: where it came from (for error messages) and its
# content, as text or as the raw bytes of a file.
_Part = tuple[str, str | bytes]


@dataclass(frozen=True)
class ResolvedSource:
    """A source string turned into a cache identity and a way to stream it.

    ``parts()`` yields the source from its start each time it is called, in bounded chunks; those of one
    file are consecutive. ``size`` is the sum of their lengths (bytes of files, characters of other text)
    where that is known without reading the source.
    """

    name: str
    identity: dict[str, Any]
    parts: Callable[[], Iterator[_Part]]
    size: int | None = None


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


def _resolve_python_docs() -> ResolvedSource:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n".join(topics[key] for key in sorted(topics))  # 0.46 MB, already in memory as a module

    def parts() -> Iterator[_Part]:
        for start in range(0, len(text), CHUNK):
            yield "python-docs", text[start : start + CHUNK]

    stats = _file_stats([Path(pydoc_data.topics.__file__)])
    identity = {"kind": "python-docs", "python": sys.version, "file": stats}
    return ResolvedSource("python-docs", identity, parts, len(text))


def _file_parts(files: Sequence[Path], universal_newlines: bool) -> Iterator[_Part]:
    """The files' bytes in chunks, with ``\r\n`` and ``\r`` turned into ``\n`` if ``universal_newlines``."""
    for f in files:
        # latin-1 maps every byte to one code point, so text mode's newline translation keeps the file's
        # other bytes as they are, whatever its encoding; UTF-8 validity is checked later, where needed.
        with open(f, encoding="latin-1", newline=None) if universal_newlines else open(f, "rb") as stream:
            while chunk := stream.read(CHUNK):
                yield str(f), chunk.encode("latin-1") if universal_newlines else chunk


def _check_readable(files: Sequence[Path]) -> None:
    """Fail before reading anything, rather than after tokenizing the files before an unreadable one."""
    for f in files:
        try:
            with open(f, "rb"):
                pass
        except PermissionError as exc:
            raise PermissionError(f"cannot read {f}: {exc.strerror}") from exc


def _resolve_tiny_shakespeare() -> ResolvedSource:
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
    stats = _file_stats([path])
    return ResolvedSource(
        str(path), {"kind": "tiny_shakespeare", "file": stats}, lambda: _file_parts([path], False), stats[0][1]
    )


def _resolve_local(source: str) -> ResolvedSource:
    expanded = os.path.expanduser(source)
    path = Path(expanded)
    # An existing path wins, so file names containing '[' need no escaping.
    if path.is_dir():
        files = _visible_files(path)
        if not files:
            raise ValueError(f"data source directory {path} contains no files")
    elif path.is_file():
        files = [path]
    elif path.exists():  # read as text, a FIFO or device would block or never end
        raise ValueError(
            f"data source {path} is not a regular file or a directory (a FIFO, socket or device);"
            " give a text file, a folder of them or a glob"
        )
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no files match the data source pattern {expanded}")
    else:
        raise FileNotFoundError(
            f"data source {source!r} is neither 'python-docs', 'tiny_shakespeare' nor"
            f" 'hf:NAME[:CONFIG]', and there is no file or directory at {path}"
        )

    def parts() -> Iterator[_Part]:
        _check_readable(files)
        # Line ends as the text loader of ``datasets`` reads them, which this source once went through.
        return _file_parts(files, True)

    stats = _file_stats(files)
    return ResolvedSource(expanded, {"kind": "files", "files": stats}, parts, sum(size for _, size, _ in stats))


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file() or (
        path / datasets.config.DATASETDICT_JSON_FILENAME
    ).is_file()


def _saved_arrow_files(path: Path) -> list[str]:
    """The Arrow files of a dataset written by ``save_to_disk``: its train split's (else its first split's)."""
    if (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
        splits = json.loads((path / datasets.config.DATASETDICT_JSON_FILENAME).read_text())["splits"]
        path = path / ("train" if "train" in splits else splits[0])
    state = json.loads((path / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())
    return [str(path / f["filename"]) for f in state["_data_files"]]


def _open_hf_dataset(name: str, config: str | None) -> datasets.IterableDataset:
    """Stream a dataset by Hub name or local path, its train (else first) split.

    Streamed, not loaded: a Hub dataset is read as it downloads, a local one batch by batch from its
    files (not memory-mapped whole), so a dataset larger than memory or disk can be tokenized.
    """
    local = Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        loaded = datasets.load_dataset("arrow", data_files=_saved_arrow_files(local), streaming=True)
    elif local.is_file() and local.suffix == ".parquet":
        loaded = datasets.load_dataset("parquet", data_files=str(local), streaming=True)
    else:
        try:
            loaded = datasets.load_dataset(name, config, streaming=True)
        except _NETWORK_ERRORS as exc:
            raise ConnectionError(
                f"cannot load the Hugging Face dataset {name!r}: no network access to the Hub"
                f" ({exc})."
                " Use a local path as data.source (a text file, glob or directory), or"
                " 'hf:PATH' with PATH a dataset saved with Dataset.save_to_disk or parquet files."
            ) from exc
    if isinstance(loaded, datasets.IterableDatasetDict):
        return loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _text_rows(source: str, ds: datasets.IterableDataset, text_column: str) -> Iterator[list[str | None]]:
    """The text column of ``ds`` in batches of rows, after checking that it exists and holds text."""
    batches = ds.iter(batch_size=_ROWS)
    first = next(batches, None)
    columns = list(ds.features) if ds.features is not None else list(first or {})
    if text_column not in columns:
        raise ValueError(
            f"data source {source!r} has no column {text_column!r}; available columns:"
            f" {', '.join(columns)} (choose one with data.text_column)"
        )
    feature = ds.features[text_column] if ds.features is not None else None
    if feature is not None:
        is_text = isinstance(feature, datasets.Value) and feature.dtype.endswith("string")
    else:  # features unknown until read: judge by the values
        is_text = all(isinstance(v, str | None) for v in first[text_column])
        feature = type(next((v for v in first[text_column] if not isinstance(v, str | None)), None)).__name__
    if not is_text:
        raise ValueError(f"column {text_column!r} of {source!r} holds {feature}, not text")
    if first is not None:
        yield first[text_column]
        for batch in batches:
            yield batch[text_column]


def _resolve_hf(source: str, text_column: str) -> ResolvedSource:
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

    def parts() -> Iterator[_Part]:
        ds = _open_hf_dataset(name, config)
        # Non-empty rows joined by newlines, in chunks of about CHUNK characters.
        pending: list[str] = []
        size, started = 0, False
        for rows in _text_rows(source, ds, text_column):
            for row in rows:
                if not row:
                    continue
                if started:
                    pending.append("\n")
                pending.append(row)
                size += len(row) + started
                started = True
            if size >= CHUNK:
                yield source, "".join(pending)
                pending, size = [], 0
        if pending:
            yield source, "".join(pending)

    return ResolvedSource(source, identity, parts)


def check_source(source: str) -> None:
    """Refuse a blank source, which as a path would mean every file under the current folder."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            f"data source is empty ({source!r}): name a text file, glob or folder, 'python-docs',"
            " 'tiny_shakespeare' or 'hf:NAME[:CONFIG]' (an unset shell variable expands to '')"
        )


def resolve(source: str, text_column: str) -> ResolvedSource:
    check_source(source)
    if source == "python-docs":
        return _resolve_python_docs()
    if source == "tiny_shakespeare":
        return _resolve_tiny_shakespeare()
    if source.startswith("hf:"):
        return _resolve_hf(source, text_column)
    return _resolve_local(source)


def text_chunks(resolved: ResolvedSource, limit: int | None = None) -> Iterator[str]:
    """The text of a source in chunks, each file checked to be UTF-8 as it streams.

    Args:
        resolved: The source.
        limit: Stop at this length (as ``ResolvedSource.size`` counts); a character cut there is dropped.
    """
    origin, decoder, consumed = None, codecs.getincrementaldecoder("utf-8")(), 0
    for where, content in _limited(resolved.parts(), limit):
        if where != origin:
            _decode(origin, decoder, b"", consumed, final=True)
            origin, consumed = where, 0
            decoder.reset()
        if isinstance(content, str):
            yield content
            continue
        yield _decode(origin, decoder, content, consumed, final=False)
        consumed += len(content)
    if limit is None:
        _decode(origin, decoder, b"", consumed, final=True)


def _decode(origin: str | None, decoder: codecs.IncrementalDecoder, content: bytes, consumed: int, final: bool) -> str:
    pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
    try:
        return decoder.decode(content, final)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{origin} is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset"
            f" {consumed - pending + exc.start}); the char tokenizer needs UTF-8 text, use tokenizer='byte'"
            " to train on raw bytes"
        ) from exc


def byte_chunks(resolved: ResolvedSource) -> Iterator[bytes]:
    """The content of a source in chunks of bytes: files as stored, other text as UTF-8."""
    for _, content in resolved.parts():
        yield content if isinstance(content, bytes) else content.encode("utf-8")


def _limited(parts: Iterator[_Part], limit: int | None) -> Iterator[_Part]:
    """``parts`` up to a total length of ``limit``, the last one cut short."""
    seen = 0
    for origin, content in parts:
        if limit is not None:
            if seen >= limit:
                return
            content = content[: limit - seen]
        seen += len(content)
        yield origin, content


def source_size(resolved: ResolvedSource) -> int:
    """``resolved.size``, or where unknown (a dataset) the length of its text, counted in one streaming pass."""
    if resolved.size is not None:
        return resolved.size
    return sum(len(content) for _, content in resolved.parts())


def stream_text(source: str, text_column: str = "text") -> Iterator[str]:
    """The text :func:`load_text` returns, in chunks of at most ``CHUNK`` characters, never held whole."""
    return text_chunks(resolve(source, text_column))


def load_text(source: str, text_column: str = "text") -> str:
    """Return the whole text of ``source`` (see the module docstring for the forms), in memory.

    Several files are concatenated in sorted path order, as ``cat`` would;
    rows of a Hugging Face dataset and Python help topics are joined with
    newlines. In local files, ``\r\n`` and ``\r`` line ends become ``\n``.
    For a corpus larger than memory, stream it with :func:`text_chunks`.

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
    resolved = resolve(source, text_column)
    return _nonempty(resolved, "".join(text_chunks(resolved)))


def load_bytes(source: str, text_column: str = "text") -> bytes:
    """Like :func:`load_text`, but as bytes: files as stored, other text as UTF-8.

    Unlike :func:`load_text` this accepts files that are not valid UTF-8.
    """
    resolved = resolve(source, text_column)
    return _nonempty(resolved, b"".join(byte_chunks(resolved)))


def _nonempty(resolved: ResolvedSource, data: str | bytes) -> str | bytes:
    if not data:
        raise ValueError(f"data source {resolved.name} contains no text")
    return data
