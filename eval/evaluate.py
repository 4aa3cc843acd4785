"""``spiking-lm evaluate``: how well a checkpoint predicts text, how much it fires, what it would cost, how
healthy its neurons are.

    spiking-lm evaluate --ckpt runs/quickstart/checkpoints/last.ckpt [--data.source SRC] [--out DIR]

Works for every variant (softmax or spiking), from a checkpoint or a ``spiking-lm export`` folder.
The text is the validation split (the last ``val_fraction`` of the tokens) of the checkpoint's
training source, or of ``--data.source`` (required for an export, which does not record its text),
tokenized with the model's vocabulary: ``--batches`` x batch-size windows of block_size tokens,
evenly spaced over the split, the same every time.

Two passes over the windows, both under ``torch.no_grad``: the first measures loss, firing rates and
tokens/s (forward only, nothing attached; the fastest batch's, which other load on a shared machine
disturbs least); the second counts operations
(``spiking_lm.eval.energy``) and per-neuron spikes (``spiking_lm.eval.health``). The energy of the
dense counterpart (same sizes, softmax + GELU) is counted by the same code for the ratio.
Prints a table; with ``--out DIR`` also writes ``DIR/evaluate.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from spiking_lm.checkpoint import load_model, read_checkpoint
from spiking_lm.config import ModelConfig
from spiking_lm.data import TextDataModule
from spiking_lm.eval import health
from spiking_lm.eval.energy import E_AC_PJ, E_MAC_PJ, OpCounter, count_dense
from spiking_lm.files import write_atomic
from spiking_lm.model import GPT

DEFAULT_BATCHES = 20


def variant(config: ModelConfig) -> str:
    """``attention/mlp_activation``, plus ``+qkv`` with spiking Q/K/V and ``+qkv_in``, ``+proj_in``, ``+fc_in``
    for spike-driven inputs: e.g. ``softmax/gelu``, ``spiking/lif``, ``spiking/lif+qkv_in+fc_in``."""
    options = (("qkv", config.spiking_qkv), ("qkv_in", config.spiking_qkv_in),
               ("proj_in", config.spiking_proj_in), ("fc_in", config.spiking_fc_in))
    return f"{config.attention}/{config.mlp_activation}" + "".join(f"+{name}" for name, on in options if on)


def validation_data(ckpt: str, tokenizer, block_size: int, source: str | None = None,
                    batches: int = DEFAULT_BATCHES, batch_size: int | None = None,
                    saved: dict | None = None) -> TextDataModule:
    """The validation windows of ``source`` (default: the checkpoint's training text) in the checkpoint's vocabulary.

    ``saved`` is the checkpoint's data settings when the caller has read them already.
    """
    if saved is None:
        saved = read_checkpoint(ckpt, mmap=True).get("datamodule_hyper_parameters") or {}
    if source is None:
        source = saved.get("source")
        if source is None:
            raise ValueError(f"{ckpt} does not record the text it was trained on; name a text with --data.source")
    same_text = source == saved.get("source")
    data = TextDataModule(
        source=source, tokenizer=tokenizer.kind, block_size=block_size,
        batch_size=batch_size or saved.get("batch_size", 12), val_fraction=saved.get("val_fraction", 0.1),
        text_column=saved.get("text_column", "text") if same_text else "text", val_batches=batches,
    )
    data.load_state_dict({"tokenizer": tokenizer.to_dict()})  # tokenize with the model's vocabulary
    data.setup()
    return data


def _forward_pass(model: GPT, windows, device: str, desc: str, progress: bool):
    """Yield (inputs, targets, loss) of each window batch, with a progress bar."""
    for x, y in tqdm(windows, desc=desc, disable=not progress, file=sys.stderr, leave=False):
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        yield x, y, loss


@torch.no_grad()
def evaluate(ckpt: str, source: str | None = None, batches: int = DEFAULT_BATCHES, batch_size: int | None = None,
             e_mac: float = E_MAC_PJ, e_ac: float = E_AC_PJ, device: str | None = None,
             progress: bool = True, label: str = "") -> dict:
    """Everything ``spiking-lm evaluate`` reports, as a JSON-ready dict (see the module docstring).

    ``label`` prefixes the logged health warnings (the sweep names its point there).
    """
    if batches < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"need --batches >= 1 and --batch-size >= 1, got {batches} and {batch_size}")
    if e_mac < 0 or e_ac < 0:
        raise ValueError(f"energies per operation must be >= 0 pJ, got --e-mac {e_mac}, --e-ac {e_ac}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_model(ckpt)
    model.to(device)
    config = model.config
    # An export folder keeps the model alone: no data settings, no step.
    saved = read_checkpoint(ckpt, mmap=True) if os.path.isfile(ckpt) else {}
    data = validation_data(ckpt, tokenizer, config.block_size, source, batches, batch_size,
                           saved.get("datamodule_hyper_parameters") or {})
    windows = data.val_dataloader()
    sites = model.sites()

    loss_sum, tokens, fastest = 0.0, 0, 0.0
    spikes = dict.fromkeys(sites, 0)
    steps = dict.fromkeys(sites, 0)
    start = time.perf_counter()
    for x, _, loss in _forward_pass(model, windows, device, "evaluate", progress):
        loss_sum += loss.item() * x.numel()  # .item() waits for the device, so the clock below is fair
        # The fastest batch: other work on a shared machine only ever slows batches down.
        fastest = max(fastest, x.numel() / (time.perf_counter() - start))
        tokens += x.numel()
        for name, site in sites.items():
            spikes[name] += site.spike_count.item()
            steps[name] += site.neuron_steps
        start = time.perf_counter()

    with OpCounter(model) as ops, health.NeuronRecorder(model) as neurons:
        for _ in _forward_pass(model, windows, device, "count ops and spikes", progress):
            pass
    energy = ops.report(e_mac, e_ac)
    dense = count_dense(config, config.block_size, e_mac, e_ac)
    energy.update(dense_pj_per_token=dense["pj_per_token"],
                  ratio_vs_dense=energy["pj_per_token"] / dense["pj_per_token"])
    site_health = neurons.health()
    loss = loss_sum / tokens
    return {
        "checkpoint": str(ckpt),
        "step": saved.get("global_step"),
        "variant": variant(config),
        "config": asdict(config),
        "params": model.num_params(),
        "timesteps": config.timesteps if sites else 1,
        "source": data.hparams.source,
        "batches": batches,
        "windows": len(windows.dataset),
        "block_size": config.block_size,
        "tokens": tokens,
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "bpc": loss / math.log(2),
        "bpc_unit": "byte" if tokenizer.kind == "byte" else "char",
        "tokens_per_s": fastest,
        "device": str(device),
        "firing_rates": {name: spikes[name] / steps[name] for name in sites},
        "mean_firing_rate": sum(spikes.values()) / sum(steps.values()) if sites else None,
        "energy": energy,
        "health": site_health,
        **health.overall(site_health),
        "warnings": health.site_warnings(site_health, label),
    }


def format_table(result: dict) -> str:
    """The report of ``evaluate`` as aligned plain text."""
    e = result["energy"]
    lines = [
        f"checkpoint   {result['checkpoint']}  (step {result['step']}; {result['variant']}, "
        f"{result['params']:,} parameters, S = {result['timesteps']})",
        f"text         {result['source']}: {result['windows']} validation windows x {result['block_size']} tokens",
        f"val loss     {result['val_loss']:.4f}",
        f"perplexity   {result['val_ppl']:.3f}",
        f"{'bits/' + result['bpc_unit']:<13}{result['bpc']:.4f}",
        f"tokens/s     {result['tokens_per_s']:,.0f}  (fastest batch; forward, no grad, {result['device']})",
        f"energy       {e['pj_per_token']:,.0f} pJ/token  ({e['mac_per_token']:,.0f} MAC x {e['e_mac_pj']} pJ + "
        f"{e['ac_per_token']:,.0f} AC x {e['e_ac_pj']} pJ); dense softmax+GELU counterpart "
        f"{e['dense_pj_per_token']:,.0f} pJ/token, ratio {e['ratio_vs_dense']:.3f}",
        "",
    ]
    if result["firing_rates"]:
        lines.append(f"{'site':<14}{'rate':>8}{'neurons':>9}{'dead':>8}{'saturated':>11}")
        for name, rate in result["firing_rates"].items():
            h = result["health"][name]
            lines.append(f"{name:<14}{rate:>8.4f}{h['neurons']:>9}{h['dead_frac']:>8.1%}{h['saturated_frac']:>11.1%}")
        lines.append(f"{'all':<14}{result['mean_firing_rate']:>8.4f}{'':>9}{result['dead_frac']:>8.1%}"
                     f"{result['saturated_frac']:>11.1%}")
        lines.append("")
    lines.append(f"{'layer':<22}{'MAC/token':>12}{'AC/token':>12}{'pJ/token':>12}")
    for name, layer in e["layers"].items():
        lines.append(f"{name:<22}{layer['mac']:>12,.0f}{layer['ac']:>12,.0f}{layer['pj']:>12,.0f}")
    lines += [f"warning: {line}" for line in result["warnings"]]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="spiking-lm evaluate",
        description="Loss, perplexity, bits per char, firing rates, energy per token and neuron health "
                    "of a checkpoint.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint of spiking-lm fit, or a spiking-lm export folder")
    p.add_argument("--data.source", dest="source", default=None,
                   help="text to evaluate on, as data.source in fit (default: the checkpoint's training text)")
    p.add_argument("--out", default=None, help="folder to write evaluate.json into (default: print only)")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="batches of validation windows")
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (default: the checkpoint's)")
    p.add_argument("--e-mac", type=float, default=E_MAC_PJ, help="pJ per multiply-accumulate on real values")
    p.add_argument("--e-ac", type=float, default=E_AC_PJ, help="pJ per accumulate triggered by a spike")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder to write evaluate.json into")
    result = evaluate(args.ckpt, args.source, args.batches, args.batch_size, args.e_mac, args.e_ac, args.device,
                      progress=not args.no_progress)
    print(format_table(result))
    if out is not None:
        write_atomic(out / "evaluate.json", json.dumps(result, indent=2) + "\n")
        print(f"wrote {out / 'evaluate.json'}")
