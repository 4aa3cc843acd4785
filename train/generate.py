"""``spiking-lm generate``: sample text from a trained checkpoint or an exported model."""

from __future__ import annotations

import argparse

import torch

from spiking_lm.checkpoint import load_model


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="spiking-lm generate",
                                description="Sample text from a trained checkpoint or an exported model.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by spiking-lm fit, or a spiking-lm export folder")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature <= 0 or (args.top_k is not None and args.top_k < 1):
        raise ValueError("need --max-new-tokens >= 0, --temperature > 0 and --top-k >= 1")
    if not args.prompt:
        raise ValueError("--prompt is empty; give at least one character to continue from")
    model, tokenizer, _ = load_model(args.ckpt)
    idx = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long, device=args.device)  # (1, L)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.to(args.device).generate(idx, args.max_new_tokens, temperature=args.temperature,
                                             top_k=args.top_k)
    print(tokenizer.decode(out[0].tolist()))
