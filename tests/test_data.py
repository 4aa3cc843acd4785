"""Tests of text sources, tokenizers, the token cache and TextDataModule (no network)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import warnings
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch

import spiking_lm.data as data
import spiking_lm.data.sources as sources
from spiking_lm.data import TextDataModule, cached_tokens, load_bytes, load_text, unigram_entropy
from spiking_lm.files import write_atomic
from spiking_lm.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every cache under tmp_path and make any Hub access fail fast."""
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "tokens"))
    monkeypatch.setenv("SPIKING_LM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _corpus(n: int = 3000) -> str:
    """Deterministic text with a known alphabet, long enough for a few windows."""
    rng = np.random.default_rng(0)
    return "".join(rng.choice(list("abcdefgh \n"), size=n))


# --- tokenizers -------------------------------------------------------------


def test_char_tokenizer_roundtrip_and_dict() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(tok.encode("world hello")) == "world hello"
    d = json.loads(json.dumps(tok.to_dict()))
    assert d == {"kind": "char", "chars": " dehlorw"}
    assert tokenizer_from_dict(d) == tok


def test_char_tokenizer_unknown_chars_name_them() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"not in the char tokenizer vocabulary: '!', 'z'"):
        tok.encode("abz!a")


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(tok.encode("naïve")) == "naïve"
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    assert tok.encode_array(b"\xff\x00").tolist() == [255, 0]
    assert tokenizer_from_dict(tok.to_dict()) == tok == build_tokenizer("byte", "ignored")


def test_unknown_tokenizer_kind_lists_valid_kinds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid kinds: char, byte"):
        build_tokenizer("bpe", "text")
    with pytest.raises(ValueError, match="valid kinds: char, byte, subword"):
        tokenizer_from_dict({"kind": "bpe"})
    with pytest.raises(ValueError, match="data.tokenizer is empty"):
        TextDataModule(tokenizer=" ")
    with pytest.raises(FileNotFoundError, match=f"tokenizer file {tmp_path / 'nope.json'} does not exist"):
        TextDataModule(tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="vocab_size must be at least 256"):
        TextDataModule(tokenizer="bpe", vocab_size=100)


def test_unigram_entropy() -> None:
    assert unigram_entropy([0, 1, 2, 3] * 5) == pytest.approx(math.log(4))
    assert unigram_entropy(np.zeros(10, dtype=np.uint16)) == 0.0


# --- sources ----------------------------------------------------------------


def test_python_docs() -> None:
    text = load_text("python-docs")
    assert len(text) > 400_000
    assert 'The "for" statement is used to iterate' in text


def test_tiny_shakespeare_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in file where the real one would lie: the source must read it and never try the network.
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
    _write(tmp_path / "data" / "tinyshakespeare.txt", text)
    monkeypatch.setattr(sources, "download_file", lambda url, dest: pytest.fail(f"downloaded {url}"))
    assert load_text("tiny_shakespeare") == text
    dm = TextDataModule(source="tiny_shakespeare", block_size=16)
    dm.setup()
    assert dm.tokenizer.chars == "".join(sorted(set(text)))
    assert dm.vocab_size == len(set(text))
    assert dm.tokenizer.decode(dm.tokens.tolist()) == text


def test_tiny_shakespeare_missing_and_download_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_dir = tmp_path / "no-data"
    monkeypatch.setenv("SPIKING_LM_DATA_DIR", str(empty_dir))
    calls = []

    def offline(url: str, dest: Path) -> None:
        calls.append((url, dest))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sources, "download_file", offline)
    expected = empty_dir / "tinyshakespeare.txt"
    with pytest.raises(FileNotFoundError, match="copy the file to") as info:
        load_text("tiny_shakespeare")
    assert str(expected) in str(info.value)
    assert calls == [(data.TINY_SHAKESPEARE_URL, expected)]
    assert not expected.exists()


def test_tiny_shakespeare_downloads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIKING_LM_DATA_DIR", str(tmp_path / "fresh"))
    calls = []

    def fake_download(url: str, dest: Path) -> None:
        calls.append(url)
        write_atomic(dest, lambda f: f.write(b"To be, or not to be\n"))

    monkeypatch.setattr(sources, "download_file", fake_download)
    assert load_text("tiny_shakespeare") == "To be, or not to be\n"
    assert load_text("tiny_shakespeare") == "To be, or not to be\n"
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["tinyshakespeare.txt"]


def test_local_file_glob_and_directory(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _write(root / "b.txt", "second\n")
    _write(root / "a.txt", "first\r\n")
    _write(root / "sub" / "c.txt", "third é\n")
    _write(root / ".hidden", "never read\n")
    assert load_text(str(root / "a.txt")) == "first\n"
    assert load_text(str(root / "*.txt")) == "first\nsecond\n"
    assert load_text(str(root / "**" / "*.txt")) == "first\nsecond\nthird é\n"
    assert load_text(str(root)) == "first\nsecond\nthird é\n"


def test_missing_path_error_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="no file or directory") as info:
        load_text(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_text(str(tmp_path / "*.md"))


def test_empty_sources_error_names_them(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="contains no text") as info:
        load_text(str(empty))
    assert str(empty) in str(info.value)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        load_text(str(tmp_path / "empty-dir"))


def test_hf_save_to_disk(tmp_path: Path) -> None:
    train = datasets.Dataset.from_dict({"text": ["one", "", "two"], "n": [1, 2, 3]})
    train.save_to_disk(str(tmp_path / "single"))
    assert load_text(f"hf:{tmp_path / 'single'}") == "one\ntwo"

    test = datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})
    datasets.DatasetDict(test=test, train=train).save_to_disk(str(tmp_path / "dict"))
    assert load_text(f"hf:{tmp_path / 'dict'}") == "one\ntwo"
    only_test = datasets.DatasetDict(test=test)
    only_test.save_to_disk(str(tmp_path / "no-train"))
    assert load_text(f"hf:{tmp_path / 'no-train'}") == "held out"


def test_hf_parquet_file_and_directory(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    for split, rows in (("train", ["alpha", "beta"]), ("test", ["gamma"])):
        datasets.Dataset.from_dict({"body": rows}).to_parquet(str(folder / f"{split}.parquet"))
    assert load_text(f"hf:{folder / 'train.parquet'}", text_column="body") == "alpha\nbeta"
    assert load_text(f"hf:{folder}", text_column="body") == "alpha\nbeta"


def test_hf_missing_or_non_text_column(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"body": ["x"], "n": [1]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"no column 'text'; available columns: body, n"):
        load_text(f"hf:{tmp_path / 'ds'}")
    with pytest.raises(ValueError, match="not text"):
        load_text(f"hf:{tmp_path / 'ds'}", text_column="n")


def test_hf_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def offline(*args: object, **kwargs: object) -> None:
        seen.append(args)
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="no network") as info:
        load_text("hf:someone/corpus:wiki")
    assert "local path" in str(info.value)
    assert seen == [("someone/corpus", "wiki")]


def test_non_utf8_file_char_vs_byte(tmp_path: Path) -> None:
    raw = b"caf\xe9 \xff\n\r\x00"
    path = _write(tmp_path / "latin1.txt", raw)
    with pytest.raises(ValueError, match="not valid UTF-8") as info:
        load_text(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        TextDataModule(source=str(path), block_size=2, val_fraction=0.5, batch_size=1).setup()

    assert load_bytes(str(path)) == raw.replace(b"\r", b"\n")
    dm = TextDataModule(source=str(path), tokenizer="byte", block_size=2, val_fraction=0.5, batch_size=1)
    dm.setup()
    assert dm.vocab_size == 256
    assert dm.tokens.tolist() == list(raw.replace(b"\r", b"\n"))


# --- token cache ------------------------------------------------------------


def test_second_setup_reuses_cache_without_tokenizing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "corpus.txt", _corpus())
    first = TextDataModule(source=str(path), block_size=16)
    first.setup()
    (tokens_file,) = (tmp_path / "tokens").glob("*.npy")
    assert first.tokens.dtype == np.uint16
    assert Path(first.tokens.filename) == tokens_file
    mtime = tokens_file.stat().st_mtime_ns

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(CharTokenizer, "encode_array", forbidden)
    monkeypatch.setattr(datasets, "load_dataset", forbidden)
    second = TextDataModule(source=str(path), block_size=16)
    second.setup()
    assert isinstance(second.tokens, np.memmap)
    assert tokens_file.stat().st_mtime_ns == mtime
    assert second.tokenizer == first.tokenizer
    np.testing.assert_array_equal(second.tokens, first.tokens)
    assert not list((tmp_path / "tokens").glob("*.part"))


def test_cache_notices_edited_source(tmp_path: Path) -> None:
    path = _write(tmp_path / "corpus.txt", "abab")
    tokens, tok = cached_tokens(str(path), "char", cache_dir=tmp_path / "c")
    assert tok.chars == "ab" and tokens.tolist() == [0, 1, 0, 1]
    _write(path, "xyzzy")
    tokens, tok = cached_tokens(str(path), "char", cache_dir=tmp_path / "c")
    assert tok.chars == "xyz" and tokens.tolist() == [0, 1, 2, 2, 1]


def test_cached_tokens_with_checkpoint_vocabulary(tmp_path: Path) -> None:
    path = _write(tmp_path / "corpus.txt", "abc")
    tokens, tok = cached_tokens(str(path), {"kind": "char", "chars": "cba!"})
    assert tok.chars == "cba!" and tokens.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match=r"cannot tokenize .*corpus.txt.*'c'"):
        cached_tokens(str(path), {"kind": "char", "chars": "ab"})


# --- TextDataModule ---------------------------------------------------------


def _datamodule(path: Path, **kwargs: object) -> TextDataModule:
    dm = TextDataModule(source=str(path), **{"block_size": 16, "batch_size": 4, **kwargs})
    dm.setup()
    return dm


def test_split_is_first_90_last_10_percent(tmp_path: Path) -> None:
    text = _corpus(3000)
    dm = _datamodule(_write(tmp_path / "corpus.txt", text))
    assert len(dm.train_tokens) == 2700 and len(dm.val_tokens) == 300
    assert dm.tokenizer.decode(dm.train_tokens.tolist()) == text[:2700]
    assert dm.tokenizer.decode(dm.val_tokens.tolist()) == text[2700:]


def test_train_batches_shapes_and_shift(tmp_path: Path) -> None:
    dm = _datamodule(_write(tmp_path / "corpus.txt", _corpus()))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(dm.train_tokens.astype(np.int64))
    for row_x, row_y in zip(x, y, strict=True):
        # Every window is a contiguous slice of the training split.
        starts = [i for i in range(len(train) - 16) if torch.equal(train[i : i + 16], row_x)]
        assert any(torch.equal(train[s + 1 : s + 17], row_y) for s in starts)


def test_train_batches_deterministic_and_index_determined(tmp_path: Path) -> None:
    path = _write(tmp_path / "corpus.txt", _corpus())
    a, b = _datamodule(path), _datamodule(path)
    first_a, first_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert all(torch.equal(u, v) for u, v in zip(first_a, first_b, strict=True))
    other = next(iter(_datamodule(path, seed=1).train_dataloader()))
    assert not torch.equal(first_a[0], other[0])

    it = iter(a.train_dataloader())
    drawn = [next(it) for _ in range(5)]
    fresh = b.train_dataloader().dataset
    assert torch.equal(drawn[4][0], fresh.batch(4)[0])


def test_train_windows_reach_both_ends_of_the_split(tmp_path: Path) -> None:
    dm = _datamodule(_write(tmp_path / "corpus.txt", _corpus(200)), val_fraction=0.5)
    windows = dm.train_dataloader().dataset
    train = torch.from_numpy(dm.train_tokens.astype(np.int64))
    drawn = [windows.sample(i) for i in range(1000)]
    assert all(x.shape == y.shape == (16,) for x, y in drawn)
    assert any(torch.equal(x, train[:16]) for x, _ in drawn)
    assert any(torch.equal(y, train[-16:]) for _, y in drawn)


class _Recorder(L.LightningModule):
    """Records the training inputs it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].clone())
        return self.weight * batch[0].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm: TextDataModule, root: Path, max_steps: int, ckpt_path: Path | None = None) -> L.Trainer:
    """Train a _Recorder, checkpointing every 2 steps under root/ckpt."""
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"
            )
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Recorder(), datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_resumed_training_sees_the_same_batches(tmp_path: Path) -> None:
    # Lightning restarts the dataloader from its first batch on resume, so
    # this only holds because train_dataloader() skips the consumed samples.
    path = _write(tmp_path / "corpus.txt", _corpus())
    full = _fit(_datamodule(path), tmp_path / "full", max_steps=5)
    ckpt = tmp_path / "full" / "ckpt" / "step=2.ckpt"
    fresh = TextDataModule(source=str(path), block_size=16, batch_size=4)
    resumed = _fit(fresh, tmp_path / "resumed", max_steps=5, ckpt_path=ckpt)
    seen_full, seen_resumed = full.lightning_module.seen, resumed.lightning_module.seen
    assert len(seen_full) == 5 and len(seen_resumed) == 3
    assert all(torch.equal(u, v) for u, v in zip(seen_full[2:], seen_resumed, strict=True))
    saved = torch.load(ckpt, weights_only=False)
    assert saved["TextDataModule"] == {"tokenizer": full.datamodule.tokenizer.to_dict()}


def test_val_windows_fixed_and_inside_val_split(tmp_path: Path) -> None:
    dm = _datamodule(_write(tmp_path / "corpus.txt", _corpus()), val_batches=3)
    batches = list(dm.val_dataloader())
    assert len(batches) == 3
    assert all(x.shape == (4, 16) for x, _ in batches)
    again = list(dm.val_dataloader())
    assert all(torch.equal(u[0], v[0]) for u, v in zip(batches, again, strict=True))
    val = torch.from_numpy(dm.val_tokens.astype(np.int64))
    first_x, last_y = batches[0][0][0], batches[-1][1][-1]
    assert torch.equal(first_x, val[:16])
    assert torch.equal(last_y, val[-16:])


def test_block_size_larger_than_val_split(tmp_path: Path) -> None:
    path = _write(tmp_path / "corpus.txt", _corpus(200))
    with pytest.raises(ValueError, match=r"block_size=50 .* validation split .* only 20 tokens"):
        _datamodule(path, block_size=50)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_must_be_inside_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=fraction)


def test_state_dict_carries_tokenizer(tmp_path: Path) -> None:
    path = _write(tmp_path / "corpus.txt", "ab" * 200)
    dm = _datamodule(path, block_size=4)
    state = dm.state_dict()
    assert json.loads(json.dumps(state)) == {"tokenizer": {"kind": "char", "chars": "ab"}}

    # A checkpoint vocabulary differing from the one built from the data wins,
    # so token ids keep matching the restored model.
    dm.load_state_dict({"tokenizer": {"kind": "char", "chars": "zba"}})
    assert dm.tokenizer.chars == "zba" and dm.vocab_size == 3
    assert dm.tokens[:4].tolist() == [2, 1, 2, 1]

    restored = TextDataModule(source=str(path), block_size=4)
    restored.load_state_dict({"tokenizer": {"kind": "char", "chars": "a"}})
    with pytest.raises(ValueError, match=r"not in the char tokenizer vocabulary: 'b'"):
        restored.setup()
    with pytest.raises(ValueError, match="'byte' tokenizer"):
        restored.load_state_dict({"tokenizer": {"kind": "byte"}})


def test_default_dirs_follow_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.default_cache_dir() == tmp_path / "tokens"
    monkeypatch.delenv("SPIKING_LM_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.data_dir() == tmp_path / ".cache" / "spiking_lm" / "data"


# --- faults: a blank source, a damaged cache, stale parts, Lightning's warnings ----------------


@pytest.mark.parametrize("source", ["", "   ", "\n"])
def test_blank_source_is_refused(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a path, "" would be the current folder: every file under it.
    _write(tmp_path / "cwd" / "secret.txt", "not training data\n")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ValueError, match=r"data source is empty .*an unset shell variable"):
        TextDataModule(source=source)
    with pytest.raises(ValueError, match="data source is empty"):
        load_text(source)


@pytest.mark.parametrize(
    "damage",
    [
        lambda npy, meta: npy.write_bytes(npy.read_bytes()[: len(npy.read_bytes()) // 2]),  # truncated
        lambda npy, meta: npy.write_bytes(b""),  # empty
        lambda npy, meta: npy.write_bytes(b"\x93NUMPY garbage"),  # header destroyed
        lambda npy, meta: meta.write_text("{not json"),
        lambda npy, meta: meta.write_text(json.dumps({**json.loads(meta.read_text()), "num_tokens": 5})),
    ],
    ids=["truncated", "empty", "bad-header", "bad-meta", "wrong-count"],
)
def test_damaged_cache_is_reported_and_rebuilt(damage, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path / "corpus.txt", _corpus())
    cache = tmp_path / "cache"
    expected, tok = cached_tokens(str(path), cache_dir=cache)
    expected = np.array(expected)
    (npy,) = cache.glob("*.npy")
    damage(npy, npy.with_suffix(".json"))
    tokens, again = cached_tokens(str(path), cache_dir=cache)
    assert np.array_equal(tokens, expected) and again == tok
    assert f"the token cache {npy} is damaged" in capsys.readouterr().err
    cached_tokens(str(path), cache_dir=cache)  # whole again: read silently
    assert capsys.readouterr().err == ""


def test_cache_removes_parts_of_killed_saves(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    part = _write(cache / f".abc.npy.{child.pid}.{'0' * 32}.part", b"half")
    os.utime(part, (time.time() - 3600, time.time() - 3600))
    cached_tokens(str(_write(tmp_path / "corpus.txt", _corpus())), cache_dir=cache)
    assert not part.exists()
    assert not list(cache.glob(".*.part"))


def test_fit_raises_no_dataloader_warning(tmp_path: Path) -> None:
    """No "IterableDataset has __len__" (or any other) warning about the data module's loaders."""
    dm = _datamodule(_write(tmp_path / "corpus.txt", _corpus()))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_Recorder(), datamodule=dm)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "IterableDataset" in m or "__len__" in m], messages
    assert trainer.num_training_batches == 3  # the epoch's length is known, for progress bars
    assert len(trainer.lightning_module.seen) == 3
