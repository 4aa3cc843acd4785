"""Text sources: a source string resolved to a cache identity and a way to read its text.

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
import os
import shutil
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets
from huggingface_hub.errors import LocalEntryNotFoundError

from spiking_lm.files import write_atomic

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
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


# A piece of a corpus: where it came from (for error messages) and its
# content, as text or as the raw bytes of a file.
_Part = tuple[str, str | bytes]


@dataclass(frozen=True)
class ResolvedSource:
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


def _resolve_python_docs() -> ResolvedSource:
    import pydoc_data.topics

    def read() -> list[_Part]:
        topics = pydoc_data.topics.topics
        return [("python-docs", "\n".join(topics[key] for key in sorted(topics)))]

    stats = _file_stats([Path(pydoc_data.topics.__file__)])
    identity = {"kind": "python-docs", "python": sys.version, "file": stats}
    return ResolvedSource("python-docs", identity, read)


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
    return ResolvedSource(
        str(path),
        {"kind": "tiny_shakespeare", "file": _file_stats([path])},
        lambda: [(str(path), path.read_bytes())],
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

    return ResolvedSource(expanded, {"kind": "files", "files": _file_stats(files)}, read)


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

    return ResolvedSource(source, identity, read)


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


def read_source(resolved: ResolvedSource, as_bytes: bool) -> str | bytes:
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
    return read_source(resolve(source, text_column), as_bytes=False)


def load_bytes(source: str, text_column: str = "text") -> bytes:
    """Like :func:`load_text`, but as bytes: files as stored, other text as UTF-8.

    Unlike :func:`load_text` this accepts files that are not valid UTF-8.
    """
    return read_source(resolve(source, text_column), as_bytes=True)
