"""Subword tokenizers (a BPE trained here, a tokenizer.json, a Hub name) and streamed tokenization (no network)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import fails, fit

import spiking_lm.data.sources as sources
from spiking_lm.checkpoint import load_model
from spiking_lm.cli import main
from spiking_lm.data import TextDataModule, cached_tokens, load_bytes, load_text
from spiking_lm.tokenizers import SubwordTokenizer, load_subword, tokenizer_from_dict, train_bpe


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches under tmp_path; the Hub offline, with an empty cache of its own."""
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "tokens"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)


def _text(n_lines: int = 400) -> str:
    """English-like lines with repeated words (so BPE has merges to learn), some non-ASCII and blank lines."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "speak", "naïve", "cœur", "thee", "hither", "—", "42", "don't"]
    lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(n_lines)]
    return "\n".join(line if i % 7 else f"\n  {line}" for i, line in enumerate(lines)) + "\n"


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _bpe(text: str, vocab_size: int = 300) -> SubwordTokenizer:
    return train_bpe([text], vocab_size)


# --- the tokenizer ----------------------------------------------------------------------------------------------


def test_bpe_round_trip_and_dict() -> None:
    text = _text()
    tok = _bpe(text)
    assert tok.kind == "subword" and 256 < tok.vocab_size <= 300
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2  # merges were learned
    assert tok.decode(ids) == text
    unseen = "Ünïcode never seen: 東京 🙂\r\n"  # byte-level: nothing is unknown
    assert tok.decode(tok.encode(unseen)) == unseen
    d = json.loads(json.dumps(tok.to_dict()))
    again = tokenizer_from_dict(d)
    assert again == tok and again.encode(text) == ids
    assert np.array_equal(tok.encode_array(text), np.array(ids))


def test_chunked_encoding_is_the_whole_texts_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    text = load_text("python-docs")[:200_000]
    tok = _bpe(text, 1000)
    whole = tok.encode(text)
    monkeypatch.setattr("spiking_lm.tokenizers._PIECE_CHARS", 512)  # many pieces per batch
    for size in (100, 4099, 65536):
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        assert np.concatenate(list(tok.encode_chunks(chunks))).tolist() == whole, size


def test_bpe_is_trained_on_the_training_split_only(tmp_path: Path) -> None:
    # The last 10% repeats a word that never occurs before it: the BPE must not learn it.
    train_part = "the king shall speak\n" * 900
    held_out = "zyxwvut\n" * 200
    path = _write(tmp_path / "corpus.txt", train_part + held_out)
    assert len(train_part) > 0.9 * (len(train_part) + len(held_out))
    dm = TextDataModule(source=str(path), tokenizer="bpe", vocab_size=300, block_size=8)
    dm.setup()
    tokens = [dm.tokenizer.decode([i]) for i in range(dm.vocab_size)]
    assert "king" in tokens or " king" in tokens
    assert not [t for t in tokens if len(t) > 1 and set(t) <= set("zyxwvut")]
    assert dm.tokenizer.decode(dm.tokens.tolist()) == train_part + held_out


def test_tokenizer_json_file_and_folder(tmp_path: Path) -> None:
    text = _text()
    tok = _bpe(text)
    corpus = _write(tmp_path / "corpus.txt", text)
    file = _write(tmp_path / "tok" / "tokenizer.json", json.dumps(tok.state))
    for spec in (str(file), str(file.parent)):
        tokens, loaded = cached_tokens(str(corpus), spec)
        assert loaded == tok and loaded.name == spec
        assert tokens.tolist() == tok.encode(text)
    _write(tmp_path / "bad.json", "{}")
    with pytest.raises(ValueError, match=r"bad.json is not a tokenizer.json of the Hugging Face tokenizers library"):
        load_subword(str(tmp_path / "bad.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        load_subword(str(tmp_path / "empty"))


def test_hub_name_without_network_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConnectionError, match=r"cannot load the tokenizer 'gpt2'.*Hub cannot be reached"):
        load_subword("gpt2")
    corpus = _write(tmp_path / "corpus.txt", _text())
    status, err = fails(
        capsys,
        [
            "fit",
            "--data.source",
            str(corpus),
            "--data.tokenizer",
            "openai-community/gpt2",
            "--trainer.max_steps",
            "1",
            "--trainer.logger",
            "false",
        ],
    )
    assert status == 2 and "cannot load the tokenizer 'openai-community/gpt2'" in err
    assert not list((tmp_path / "tokens").glob("*.npy"))


# --- checkpoints, export, generate, evaluate, resume -----------------------------------------------------------


def test_checkpoint_and_export_generate_with_the_same_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = _write(tmp_path / "corpus.txt", _text(2000))
    root = fit(tmp_path, "--data.source", str(corpus), "--data.tokenizer", "bpe", "--data.vocab_size", "320", steps=2)
    ckpt = root / "checkpoints" / "last.ckpt"
    (meta,) = (tmp_path / "tokens").glob("*.json")
    trained = tokenizer_from_dict(json.loads(meta.read_text())["tokenizer"])
    model, tok, _ = load_model(str(ckpt))
    assert tok == trained and model.config.vocab_size == tok.vocab_size
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    assert tokenizer_from_dict(json.loads((tmp_path / "export" / "vocab.json").read_text())) == trained

    # Neither the text nor the token cache is needed: the tokenizer travels with the model.
    corpus.unlink()
    for path in (tmp_path / "tokens").iterdir():
        path.unlink()
    prompt = "the king shall"
    outputs = []
    for where in (ckpt, tmp_path / "export"):
        capsys.readouterr()
        main(["generate", "--ckpt", str(where), "--prompt", prompt, "--max_new_tokens", "12", "--seed", "7"])
        outputs.append(capsys.readouterr().out.removesuffix("\n"))
    torch.manual_seed(7)
    idx = torch.tensor([trained.encode(prompt)])
    with torch.no_grad():
        expected = trained.decode(model.generate(idx, 12)[0].tolist())
    assert outputs == [expected, expected] and expected.startswith(prompt)


@pytest.mark.slow
def test_resume_and_evaluate_use_the_checkpoints_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = _write(tmp_path / "corpus.txt", _text(2000))
    args = ("--data.source", str(corpus), "--data.tokenizer", "bpe", "--data.vocab_size", "320")
    root = fit(tmp_path, *args, steps=2)
    _, tok, _ = load_model(str(root / "checkpoints" / "last.ckpt"))
    # The text has grown since, so a BPE trained on it would differ (in size too): the resumed run must take
    # the checkpoint's, which its embedding was trained with, and tokenize the text with it.
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("zyzzyva quixotic\n" * 500)
    fit(tmp_path, *args, "--ckpt_path", "last", steps=3)
    _, resumed, _ = load_model(str(root / "checkpoints" / "last.ckpt"))
    assert resumed == tok
    entries = [json.loads(p.read_text()) for p in (tmp_path / "tokens").glob("*.json")]
    assert len(entries) == 2 and all(tokenizer_from_dict(e["tokenizer"]) == tok for e in entries)

    capsys.readouterr()
    main(["evaluate", "--ckpt", str(root / "checkpoints" / "last.ckpt"), "--batches", "1", "--progress", "false"])
    out = capsys.readouterr().out
    assert "bits/token" in out

    dm = TextDataModule(source=str(corpus), tokenizer="char", block_size=8)
    with pytest.raises(ValueError, match="trained with the 'subword' tokenizer but data.tokenizer is 'char'"):
        dm.load_state_dict({"tokenizer": tok.to_dict()})


# --- streaming: bounded chunks, exact results, nothing complete after a kill ------------------------------------


def test_streamed_sources_give_the_whole_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunk ends fall inside a multi-byte character and between \r and \n.
    monkeypatch.setattr(sources, "CHUNK", 5)
    content = "ab\r\ncd\ré\u00e9x\r\n\r\nend".encode()
    files = [_write(tmp_path / "c" / f"{i}.txt", content) for i in range(2)]
    expected = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n") * 2
    assert load_bytes(str(tmp_path / "c")) == expected
    assert load_text(str(tmp_path / "c")) == expected.decode()
    tokens, tok = cached_tokens(str(tmp_path / "c"), "char")
    assert tok.decode(tokens.tolist()) == expected.decode()
    assert cached_tokens(str(files[0]), "byte")[0].tolist() == list(expected[: len(expected) // 2])

    datasets.Dataset.from_dict({"text": ["one", "", "two", "three"] * 3}).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setattr(sources, "_ROWS", 2)
    assert load_text(f"hf:{tmp_path / 'ds'}") == "\n".join(["one", "two", "three"] * 3)


def test_utf8_error_names_the_offset_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK", 4)
    path = _write(tmp_path / "bad.txt", "abcdéfgh".encode() + b"\xff" + b"tail")
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8 \(byte 0xff at offset 9\)"):
        cached_tokens(str(path), "char")
    truncated = _write(tmp_path / "cut.txt", "abcé".encode()[:-1])
    with pytest.raises(ValueError, match=r"cut.txt is not valid UTF-8 \(byte 0xc3 at offset 3\)"):
        load_text(str(truncated))


def test_tokenizers_see_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK", 1000)
    text = _text(3000)
    corpus = _write(tmp_path / "corpus.txt", text)
    seen: list[int] = []
    original = SubwordTokenizer.encode_chunks

    def recording(self, chunks):
        return original(self, (seen.append(len(c)) or c for c in chunks))

    monkeypatch.setattr(SubwordTokenizer, "encode_chunks", recording)
    tokens, tok = cached_tokens(str(corpus), "bpe", vocab_size=300)
    assert len(seen) > 50 and max(seen) <= 1000
    assert tokens.tolist() == tok.encode(text)


_KILLED_CHILD = """
import sys, time
from spiking_lm.data import cached_tokens
from spiking_lm.tokenizers import CharTokenizer
original = CharTokenizer.encode_chunks
def slow(self, chunks):
    for ids in original(self, chunks):
        yield ids
        time.sleep(60)
CharTokenizer.encode_chunks = slow
cached_tokens(sys.argv[1], "char", cache_dir=sys.argv[2])
"""


@pytest.mark.slow
def test_a_kill_during_tokenization_leaves_no_complete_entry(tmp_path: Path) -> None:
    text = _text(3000)
    corpus, cache = _write(tmp_path / "corpus.txt", text), tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(corpus), str(cache)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cache.glob(".*.part")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.2)
    (part,) = cache.glob(".*.part")
    time.sleep(0.5)  # let it write the first chunk's tokens
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert part.exists() and not list(cache.glob("*.npy")) and not list(cache.glob("*.json"))
    tokens, tok = cached_tokens(str(corpus), "char", cache_dir=cache)  # rebuilt whole, not taken from the part
    assert tok.decode(tokens.tolist()) == text
