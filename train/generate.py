"""``spiking-lm generate``: sample text from a trained checkpoint or an exported model, streamed as it comes."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import TextIO

import torch
from tqdm import tqdm

from spiking_lm.checkpoint import load_model
from spiking_lm.device import resolve_device

# Tokens decoded together at most: a line longer than this is written in pieces of this many tokens, so that
# decoding stays O(1) per token however long the output (see TextStream).
STREAM_TOKENS = 256


class TextStream:
    """Writes tokens as text as they are sampled.

    Tokens are decoded together since the last line break (or the last ``STREAM_TOKENS`` tokens), and only the
    new end of that text is written: a byte-level token can end inside a character, whose text waits for the
    rest of it, and some decoders join tokens differently than they decode them one by one.
    """

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO):
        self.decode, self.out = decode, out
        self.tokens: list[int] = []
        self.written = 0  # characters of decode(self.tokens) already written

    def add(self, tokens: list[int], end: str = "") -> None:
        """Write the text that ``tokens`` complete, then ``end`` (which also writes a character left unfinished)."""
        self.tokens += tokens
        text = self.decode(self.tokens)
        if text.endswith("\ufffd") and len(self.tokens) < STREAM_TOKENS and not end:
            return  # inside a character
        self.out.write(text[self.written :] + end)
        self.out.flush()
        self.written = len(text)
        if text.endswith("\n") or len(self.tokens) >= STREAM_TOKENS:
            self.tokens, self.written = [], 0


def generate(
    ckpt: str,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 1337,
    device: str | None = None,
    use_cache: bool = True,
) -> None:
    """Sample text from a trained checkpoint or an exported model, and print it after the prompt as it comes.

    The text is written token by token; with the output redirected to a file, a progress bar on the terminal
    counts the tokens. Ctrl-C stops it, keeping what was written.

    Args:
        ckpt: checkpoint written by spiking-lm fit, or a spiking-lm export folder
        prompt: text to continue (default: a newline); every character must be in the model's vocabulary
        max_new_tokens: tokens to sample after the prompt (>= 0)
        temperature: divides the logits before sampling (finite, > 0): lower is more conservative
        top_k: sample only among the k most likely tokens (>= 1; default: all)
        seed: random seed; the same seed gives the same text from a checkpoint and its export
        device: cpu, cuda or cuda:N (default: cuda when available)
        use_cache: keep each layer's keys and values, so each new token runs one position through the model;
            false reruns the whole context for every token (the same text, slower: to compare)
    """
    if max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    if not prompt:
        raise ValueError("--prompt is empty; give at least one character to continue from")
    where = resolve_device(device)
    model, tokenizer, _ = load_model(ckpt)
    context = tokenizer.encode(prompt)
    idx = torch.tensor([context], dtype=torch.long, device=where)  # (1, L)
    torch.manual_seed(seed)
    stream = TextStream(tokenizer.decode, sys.stdout)
    # The streamed text is the progress on a terminal; a bar only where the text goes elsewhere.
    bar = not sys.stdout.isatty() and sys.stderr.isatty()
    tokens = model.to(where).sample(idx, max_new_tokens, temperature, top_k, use_cache)  # (1, 1) each
    sampled = 0
    try:
        stream.add(context)
        for token in tqdm(tokens, total=max_new_tokens, disable=not bar, unit="tok", file=sys.stderr):
            stream.add(token[0].tolist())
            sampled += 1
        stream.add([], end="\n")
    except KeyboardInterrupt:
        stream.add([], end="\n")
        print(f"spiking-lm: generate stopped by Ctrl-C after {sampled} of {max_new_tokens} tokens", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader left (say `| head`): stop quietly, and keep Python's exit flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
