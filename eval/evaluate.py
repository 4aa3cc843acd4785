"""``spiking-lm evaluate``: how well a checkpoint predicts text, how much it fires, what it would cost, how
healthy its neurons are.

    spiking-lm evaluate --ckpt runs/quickstart/checkpoints/last.ckpt [--data.source SRC] [--out DIR]
                        [--data.unknown skip|CHAR]

Works for every variant (softmax or spiking), from a checkpoint or a ``spiking-lm export`` folder.
The text is the validation split (the last ``val_fraction`` of the tokens) of the checkpoint's
training source, or of ``--data.source`` (required for an export, which does not record its text),
tokenized with the model's vocabulary: ``--batches`` x batch-size windows of block_size tokens,
evenly spaced over the split, the same every time. A character outside the model's vocabulary is an
error unless ``--data.unknown`` skips or maps such characters; then the report counts them.

Two passes over the windows, both under ``torch.no_grad``: the first measures loss, firing rates and
tokens/s (forward only, no hooks, plain spike counts; the fastest batch's, which other load on a shared machine
disturbs least); the second counts operations
(``spiking_lm.eval.energy``) and per-neuron spikes (``spiking_lm.eval.health``). The energy of the
dense counterpart (same sizes, softmax + GELU) is counted by the same code for the ratio, under
``--e_mac``/``--e_ac`` and under each 45 nm preset (fp32, fp16, int8), optionally with a memory term
(``--memory_pj_per_byte``; see ``docs/energy.md``).
Prints a table; with ``--out DIR`` also writes ``DIR/evaluate.json``, and with ``--wandb true`` logs it to a
W&B run of its own (``log_to_wandb``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from spiking_lm.checkpoint import load_model, read_checkpoint
from spiking_lm.config import ModelConfig
from spiking_lm.data import TextDataModule, stream_text
from spiking_lm.device import resolve_device
from spiking_lm.eval import health
from spiking_lm.eval.energy import E_AC_PJ, E_MAC_PJ, OpCounter, count_dense, preset_ratios
from spiking_lm.files import check_writable, write_atomic
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT
from spiking_lm.tokenizers import UnknownCharacters, tokenizer_from_dict
from spiking_lm.wandb_mode import init_run

DEFAULT_BATCHES = 20
HEALTH_COLUMNS = ("neurons", "dead_frac", "saturated_frac", "max_spikes_per_token")


@dataclass(frozen=True)
class EvalText:
    """The text to evaluate on."""

    source: str | None = None
    """text to evaluate on, as data.source in fit (default: the checkpoint's training text; an export needs it)"""
    unknown: str = "error"
    """characters outside the model's vocabulary (char tokenizer): error, skip (drop them), or one character of
    the vocabulary to map them to, e.g. ' '; the report counts them"""


def variant(config: ModelConfig) -> str:
    """``attention/mlp_activation``, plus ``+qkv`` with spiking Q/K/V and ``+qkv_in``, ``+proj_in``, ``+fc_in``
    for spike-driven inputs: e.g. ``softmax/gelu``, ``spiking/lif``, ``spiking/lif+qkv_in+fc_in``."""
    options = (
        ("qkv", config.spiking_qkv),
        ("qkv_in", config.spiking_qkv_in),
        ("proj_in", config.spiking_proj_in),
        ("fc_in", config.spiking_fc_in),
    )
    return f"{config.attention}/{config.mlp_activation}" + "".join(f"+{name}" for name, on in options if on)


def validation_data(
    ckpt: str,
    tokenizer,
    block_size: int,
    source: str | None = None,
    batches: int = DEFAULT_BATCHES,
    batch_size: int | None = None,
    saved: dict | None = None,
) -> TextDataModule:
    """The validation windows of ``source`` (default: the checkpoint's training text) in the checkpoint's vocabulary.

    ``saved`` is the checkpoint's data settings when the caller has read them already. ``tokenizer``'s
    policy for unknown characters applies.
    """
    if saved is None:
        saved = read_checkpoint(ckpt, mmap=True).get("datamodule_hyper_parameters") or {}
    if source is None:
        source = saved.get("source")
        if source is None:
            raise ValueError(f"{ckpt} does not record the text it was trained on; name a text with --data.source")
    same_text = source == saved.get("source")
    data = TextDataModule(
        source=source,
        tokenizer=tokenizer.kind,
        block_size=block_size,
        batch_size=batch_size or saved.get("batch_size", 12),
        val_fraction=saved.get("val_fraction", 0.1),
        text_column=saved.get("text_column", "text") if same_text else "text",
        val_batches=batches,
    )
    data.load_state_dict({"tokenizer": tokenizer.to_dict()})  # tokenize with the model's vocabulary
    try:
        data.setup()
    except ValueError as e:
        if isinstance(e.__cause__, UnknownCharacters):
            raise ValueError(
                f"{e}; --data.unknown skip drops such characters, --data.unknown ' ' (or another"
                " character of the vocabulary) maps them to it"
            ) from e
        raise
    return data


def _forward_pass(model: GPT, windows, device: str, desc: str, progress: bool, firing: FiringCounts):
    """Yield (inputs, targets, loss) of each window batch, with a progress bar; the counts go to ``firing``."""
    for x, y in tqdm(windows, desc=desc, disable=not progress, file=sys.stderr, leave=False):
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y, firing=firing)
        yield x, y, loss


@torch.no_grad()
def evaluate(
    ckpt: str,
    text: EvalText = EvalText(),
    batches: int = DEFAULT_BATCHES,
    batch_size: int | None = None,
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
    device: str | None = None,
    progress: bool | None = None,
    label: str = "",
    memory_pj_per_byte: float | None = None,
) -> dict:
    """Everything ``spiking-lm evaluate`` reports, as a JSON-ready dict (see the module docstring).

    ``label`` prefixes the logged health warnings (the sweep names its point there); ``memory_pj_per_byte``
    adds the memory term to the presets' energies. ``progress`` draws progress bars; by default
    when stderr is a terminal, so that none is drawn into a log file.
    """
    progress = sys.stderr.isatty() if progress is None else progress
    if batches < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"need --batches >= 1 and --batch_size >= 1, got {batches} and {batch_size}")
    if not (e_mac >= 0 and e_ac >= 0 and math.isfinite(e_mac + e_ac)):
        raise ValueError(f"energies per operation must be finite and >= 0 pJ, got --e_mac {e_mac}, --e_ac {e_ac}")
    if memory_pj_per_byte is not None and not (memory_pj_per_byte >= 0 and math.isfinite(memory_pj_per_byte)):
        raise ValueError(f"--memory_pj_per_byte must be finite and >= 0, got {memory_pj_per_byte}")
    device = str(resolve_device(device))
    model, tokenizer, _ = load_model(ckpt)
    skips_or_maps = text.unknown != "error" and tokenizer.kind == "char"  # bytes are never unknown
    if skips_or_maps:
        tokenizer = tokenizer_from_dict({**tokenizer.to_dict(), "unknown": text.unknown})
    model.to(device)
    config = model.config
    # An export folder keeps the model alone: no data settings, no step.
    saved = read_checkpoint(ckpt, mmap=True) if os.path.isfile(ckpt) else {}
    data = validation_data(
        ckpt,
        tokenizer,
        config.block_size,
        text.source,
        batches,
        batch_size,
        saved.get("datamodule_hyper_parameters") or {},
    )
    # Counted over the whole text, whose end is the validation split.
    unknown = (
        sum(map(tokenizer.count_unknown, stream_text(data.hparams.source, data.hparams.text_column)))
        if skips_or_maps
        else 0
    )
    windows = data.val_dataloader()
    sites = model.sites()

    loss_sum, tokens, fastest = 0.0, 0, 0.0
    firing = FiringCounts()
    start = time.perf_counter()
    for x, _, loss in _forward_pass(model, windows, device, "evaluate", progress, firing):
        loss_sum += loss.item() * x.numel()  # .item() waits for the device, so the clock below is fair
        # The fastest batch: other work on a shared machine only ever slows batches down.
        fastest = max(fastest, x.numel() / (time.perf_counter() - start))
        tokens += x.numel()
        start = time.perf_counter()

    counts = FiringCounts(per_neuron=True, products=True)
    with OpCounter(model, counts) as ops:
        for _ in _forward_pass(model, windows, device, "count ops and spikes", progress, counts):
            pass
    energy = ops.report(e_mac, e_ac)
    dense = count_dense(config, config.block_size, e_mac, e_ac)
    energy.update(
        dense_pj_per_token=dense["pj_per_token"],
        ratio_vs_dense=energy["pj_per_token"] / dense["pj_per_token"],
        presets=preset_ratios(ops, config, config.block_size, memory_pj_per_byte),
    )
    site_health = health.site_health(model, counts)
    mean_rate = firing.mean_rate()
    loss = loss_sum / tokens
    return {
        "checkpoint": str(ckpt),
        "step": saved.get("global_step"),
        "variant": variant(config),
        "config": asdict(config),
        "params": model.num_params(),
        "timesteps": config.timesteps if sites else 1,
        "source": data.hparams.source,
        "unknown_chars": {"policy": text.unknown, "count": unknown},
        "batches": batches,
        "windows": len(windows.dataset),
        "block_size": config.block_size,
        "tokens": tokens,
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "bpc": loss / math.log(2),
        "bpc_unit": {"byte": "byte", "subword": "token"}.get(tokenizer.kind, "char"),
        "tokens_per_s": fastest,
        "device": str(device),
        "firing_rates": {name: rate.item() for name, rate in firing.rates().items()},
        "mean_firing_rate": mean_rate["neuron_weighted"].item() if mean_rate else None,
        "energy": energy,
        "health": site_health,
        **health.overall(site_health),
        "warnings": health.site_warnings(site_health, label),
    }


def _unknown_line(unknown: dict) -> list[str]:
    if unknown["policy"] == "error":
        return []
    action = "skipped" if unknown["policy"] == "skip" else f"mapped to {unknown['policy']!r}"
    return [f"unknown      {unknown['count']:,} character(s) of the text outside the vocabulary, {action}"]


def format_table(result: dict) -> str:
    """The report of ``evaluate`` as aligned plain text."""
    e = result["energy"]
    lines = [
        f"checkpoint   {result['checkpoint']}  (step {result['step']}; {result['variant']}, "
        f"{result['params']:,} parameters, S = {result['timesteps']})",
        f"text         {result['source']}: {result['windows']} validation windows x {result['block_size']} tokens",
        *_unknown_line(result["unknown_chars"]),
        f"val loss     {result['val_loss']:.4f}",
        f"perplexity   {result['val_ppl']:.3f}",
        f"{'bits/' + result['bpc_unit']:<13}{result['bpc']:.4f}",
        f"tokens/s     {result['tokens_per_s']:,.0f}  (fastest batch; forward, no grad, {result['device']})",
        f"energy       {e['pj_per_token']:,.0f} pJ/token  ({e['mac_per_token']:,.0f} MAC x {e['e_mac_pj']} pJ + "
        f"{e['ac_per_token']:,.0f} AC x {e['e_ac_pj']} pJ); dense softmax+GELU counterpart "
        f"{e['dense_pj_per_token']:,.0f} pJ/token, ratio {e['ratio_vs_dense']:.3f}",
        *_preset_lines(e["presets"]),
        "",
    ]
    if result["firing_rates"]:
        lines.append(f"{'site':<14}{'rate':>8}{'neurons':>9}{'dead':>8}{'saturated':>11}")
        for name, rate in result["firing_rates"].items():
            h = result["health"][name]
            lines.append(f"{name:<14}{rate:>8.4f}{h['neurons']:>9}{h['dead_frac']:>8.1%}{h['saturated_frac']:>11.1%}")
        lines.append(
            f"{'all':<14}{result['mean_firing_rate']:>8.4f}{'':>9}{result['dead_frac']:>8.1%}"
            f"{result['saturated_frac']:>11.1%}"
        )
        lines.append("")
    lines.append(f"{'layer':<22}{'MAC/token':>12}{'AC/token':>12}{'pJ/token':>12}")
    for name, layer in e["layers"].items():
        lines.append(f"{name:<22}{layer['mac']:>12,.0f}{layer['ac']:>12,.0f}{layer['pj']:>12,.0f}")
    lines += [f"warning: {line}" for line in result["warnings"]]
    return "\n".join(lines)


def _preset_lines(presets: dict[str, dict]) -> list[str]:
    """One line per 45 nm preset: its ratio, and with a memory term its share and the compute-only ratio."""
    lines = []
    for name, p in presets.items():
        line = (
            f"  {name:<5} {p['e_mac_pj']:g}/{p['e_ac_pj']:g} pJ per MAC/AC: {p['pj_per_token']:,.0f} pJ/token, "
            f"ratio {p['ratio_vs_dense']:.3f}"
        )
        if "pj_per_byte" in p:
            line += (
                f" with memory ({p['bytes_per_token']:,.0f} B/token x {p['pj_per_byte']:g} pJ/B; "
                f"compute alone {p['compute_ratio_vs_dense']:.3f})"
            )
        lines.append(line)
    return lines


def log_to_wandb(result: dict, project: str, folder: Path | None) -> None:
    """``result`` as a W&B run of its own (offline where W&B cannot run online): the whole JSON as the run's
    summary, and the per-site table (firing rate, neurons, dead, saturated) and per-layer energy table as tables.

    The run folder goes under ``folder`` (default: the working directory, as W&B's own default).
    """
    import wandb

    config = {key: result[key] for key in ("checkpoint", "step", "variant", "source", "batches", "device")}
    run = init_run(
        project=project,
        job_type="evaluate",
        name=f"evaluate {result['checkpoint']}",
        dir=None if folder is None else str(folder),
        config={**config, "model": result["config"]},
    )
    try:
        run.summary.update(result)
        sites = [
            [name, rate, *(result["health"][name][key] for key in HEALTH_COLUMNS)]
            for name, rate in result["firing_rates"].items()
        ]
        layers = [[name, layer["mac"], layer["ac"], layer["pj"]] for name, layer in result["energy"]["layers"].items()]
        run.log(
            {
                "sites": wandb.Table(columns=["site", "firing_rate", *HEALTH_COLUMNS], data=sites),
                "energy_layers": wandb.Table(
                    columns=["layer", "mac_per_token", "ac_per_token", "pj_per_token"], data=layers
                ),
            }
        )
    finally:
        run.finish()


def main(
    ckpt: str,
    data: EvalText = EvalText(),
    out: str | None = None,
    batches: int = DEFAULT_BATCHES,
    batch_size: int | None = None,
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
    device: str | None = None,
    progress: bool | None = None,
    memory_pj_per_byte: float | None = None,
    wandb: bool = False,
    wandb_project: str = "spiking-lm",
) -> None:
    """Loss, perplexity, bits per char, firing rates, energy per token and neuron health of a checkpoint.

    Args:
        ckpt: checkpoint of spiking-lm fit, or a spiking-lm export folder
        data: the text to evaluate on
        out: folder to write evaluate.json into (default: print only)
        batches: batches of validation windows (>= 1)
        batch_size: windows per batch (default: the checkpoint's)
        e_mac: pJ per multiply-accumulate on real values
        e_ac: pJ per accumulate triggered by a spike
        device: cpu, cuda or cuda:N (default: cuda when available)
        progress: show progress bars (default: when stderr is a terminal, so none is drawn into a log file)
        memory_pj_per_byte: add to each preset's energy the bytes read per token at this many pJ per byte
            (e.g. 640 / 4 = 160 for DRAM, EIE's figure; default: no memory term)
        wandb: also log the result to a W&B run of its own, under --out (offline where W&B cannot run online;
            WANDB_MODE wins): the JSON as its summary, the per-site and per-layer tables
        wandb_project: W&B project of that run
    """
    folder = Path(out) if out else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; give a folder to write evaluate.json into")
    if folder is not None:  # before the evaluation, which may take long
        check_writable(folder, "--out")
    result = evaluate(
        ckpt, data, batches, batch_size, e_mac, e_ac, device, progress=progress, memory_pj_per_byte=memory_pj_per_byte
    )
    print(format_table(result))
    if folder is not None:
        write_atomic(folder / "evaluate.json", json.dumps(result, indent=2) + "\n")
        print(f"wrote {folder / 'evaluate.json'}")
    if wandb:
        log_to_wandb(result, wandb_project, folder)
    if not math.isfinite(result["val_loss"]):
        raise ValueError(
            f"the loss of {ckpt} on this text is {result['val_loss']}: the model overflows (its"
            " logits are not finite); use a checkpoint from before the run diverged"
        )
