"""``spiking-lm generate``: sampling from a checkpoint, and every bad option refused before any work."""

from __future__ import annotations

import io
import os
import selectors
import subprocess
import sys
import time

import pytest
from conftest import fails

from spiking_lm.cli import main
from spiking_lm.tokenizers import ByteTokenizer
from spiking_lm.train.generate import TextStream


@pytest.mark.slow
def test_generate_from_checkpoint(capsys, ckpt):
    capsys.readouterr()
    main(["generate", "--ckpt", str(ckpt), "--prompt", "The for", "--max_new_tokens", "25", "--top_k", "5"])
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("The for") and len(text) == len("The for") + 25


def test_cached_and_uncached_generation_print_the_same_text(capsys, ckpt):
    texts = []
    for use_cache in ("true", "false"):
        capsys.readouterr()
        main(
            [
                "generate",
                "--ckpt",
                str(ckpt),
                "--prompt",
                "The",
                "--max_new_tokens",
                "40",  # block_size is 16
                "--use_cache",
                use_cache,
            ]
        )
        texts.append(capsys.readouterr().out)
    assert len(texts[0]) == len("The") + 40 + 1 and texts[0] == texts[1]


@pytest.mark.slow
def test_a_huge_max_new_tokens_streams_its_text(ckpt):
    # Issue 19, defect 17: the text arrives token by token while the rest is still being sampled.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spiking_lm.cli",
            "generate",
            "--ckpt",
            str(ckpt),
            "--prompt",
            "A",
            "--max_new_tokens",
            "100000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    received = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 300  # a bound for a broken stream, not a speed test
            while len(received) < 200 and selector.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                received += chunk
        still_running = proc.poll() is None
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert received.startswith(b"A") and len(received) >= 200, err.decode(errors="replace")[-2000:]
    assert still_running


def test_the_stream_writes_a_character_once_its_last_byte_is_sampled():
    out = io.StringIO()
    stream = TextStream(ByteTokenizer().decode, out)
    written = []
    for byte in "a\u00e9\u2603\nb".encode():
        stream.add([byte])
        written.append(out.getvalue())
    # a, the 2 bytes of e-acute, the 3 of the snowman, a line break, b: nothing half-decoded is ever written
    assert written == [
        "a",
        "a",
        "a\u00e9",
        "a\u00e9",
        "a\u00e9",
        "a\u00e9\u2603",
        "a\u00e9\u2603\n",
        "a\u00e9\u2603\nb",
    ]
    stream.add([0xE2], end="\n")  # a character cut off by the end is written as U+FFFD
    assert out.getvalue().endswith("b\ufffd\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "\u2603"], "\u2603"),
        (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        (["--temperature", "nan"], 'Parser key "temperature"'),  # not a float to jsonargparse: YAML spells it .nan
        (["--temperature", ".nan"], "--temperature must be a finite number > 0, got nan"),
        (["--temperature", ".inf"], "--temperature must be a finite number > 0, got inf"),
        (["--temperature", "-1"], "--temperature must be a finite number > 0, got -1.0"),
        (["--temperature", "warm"], 'Parser key "temperature"'),
        (["--top_k", "0"], "--top_k must be >= 1, got 0"),
        (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 0, got -1"),
        (["--use_cache", "sometimes"], 'Parser key "use_cache"'),
        (["--device", "tpu"], "--device tpu: torch knows no such device"),
        (["--device", "cuda:99"], "--device cuda:99 is not available on this machine"),
        (["--max-new-tokens", "5"], "--max-new-tokens"),  # the old spelling: flags are LightningCLI's style now
    ],
)
def test_generate_rejects_bad_input(capsys, ckpt, argv, message):
    status, err = fails(capsys, ["generate", "--ckpt", str(ckpt), *argv])
    assert status == 2 and err.startswith("spiking-lm: error: ") and message in err, err


def test_generate_help_comes_from_the_docstring(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: spiking-lm generate" in out
    assert "--max_new_tokens" in out and "tokens to sample after the prompt" in out and "--top_k" in out
    assert "--use_cache" in out and "one position through the model" in out
