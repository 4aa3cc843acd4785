"""A finished sweep's outputs: results.csv, the figures, report.md, and a summary run in the W&B group.

A *record* is one point's ``evaluate`` result plus ``point``, ``settings``, ``baseline`` and ``max_steps``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from spiking_lm.checkpoint import load_model
from spiking_lm.eval import plots, throughput
from spiking_lm.eval.evaluate import validation_data
from spiking_lm.eval.health import spike_trains
from spiking_lm.files import write_atomic
from spiking_lm.wandb_mode import init_run

COLUMNS = [
    "params",
    "timesteps",
    "mean_firing_rate",
    "val_loss",
    "val_ppl",
    "bpc",
    "energy_pj_per_token",
    "energy_ratio_vs_softmax",
    "energy_ratio_fp16",
    "energy_ratio_int8",
    "tokens_per_s",
    "dead_frac",
    "saturated_frac",
]
PRESET_NAMES = ("fp32", "fp16", "int8")


def preset_ratios(record: dict, memory: bool) -> dict[str, float | None]:
    """A record's energy ratio vs its dense counterpart per 45 nm preset: compute alone, or with the memory term
    (None where the record has no such figure, e.g. one evaluated before the presets existed)."""
    ratios = {}
    for name in PRESET_NAMES:
        p = record["energy"].get("presets", {}).get(name)
        if p is None or (memory and "pj_per_byte" not in p):
            ratios[name] = None
        else:  # with a memory term, ratio_vs_dense includes it
            ratios[name] = p["ratio_vs_dense"] if memory else p.get("compute_ratio_vs_dense", p["ratio_vs_dense"])
    return ratios


def has_memory_term(records: list[dict]) -> bool:
    return any("pj_per_byte" in p for r in records for p in r["energy"].get("presets", {}).values())


RASTER_TOKENS = 48


def table(records: list[dict], keys: list[str], tokens_per_s: list[float]) -> tuple[list[str], list[dict]]:
    """The results table: its columns, and one row per record (None where a value does not apply).

    ``energy_ratio_vs_softmax`` is under the evaluation's ``e_mac``/``e_ac`` (fp32 by default); the fp16 and
    int8 presets' ratios follow, and with a memory term, every preset's ratio with it (``*_mem``).
    """
    memory = has_memory_term(records)
    mem_columns = [f"energy_ratio_{name}_mem" for name in PRESET_NAMES] if memory else []
    rows = []
    for r, speed in zip(records, tokens_per_s, strict=True):
        compute, with_memory = preset_ratios(r, False), preset_ratios(r, True)
        rows.append(
            {
                "variant": r["variant"],
                **{key: None if r["baseline"] else r["settings"][key] for key in keys},
                "params": r["params"],
                "timesteps": r["timesteps"],
                "mean_firing_rate": r["mean_firing_rate"],
                "val_loss": r["val_loss"],
                "val_ppl": r["val_ppl"],
                "bpc": r["bpc"],
                "energy_pj_per_token": r["energy"]["pj_per_token"],
                # The dense counterpart of a config is what its softmax baseline counts to, so this
                # ratio holds with or without a trained baseline in the sweep.
                "energy_ratio_vs_softmax": r["energy"]["ratio_vs_dense"],
                "energy_ratio_fp16": compute["fp16"],
                "energy_ratio_int8": compute["int8"],
                **{f"energy_ratio_{name}_mem": with_memory[name] for name in PRESET_NAMES if memory},
                "tokens_per_s": speed,
                "dead_frac": r["dead_frac"],
                "saturated_frac": r["saturated_frac"],
            }
        )
    columns = COLUMNS[: COLUMNS.index("tokens_per_s")] + mem_columns + COLUMNS[COLUMNS.index("tokens_per_s") :]
    return ["variant", *keys, *columns], rows


def csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            ["" if row[c] is None else f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in columns]
        )
    return buffer.getvalue()


_MARKDOWN_FORMATS = {
    "params": "{:,}",
    "mean_firing_rate": "{:.4f}",
    "val_loss": "{:.4f}",
    "val_ppl": "{:.3f}",
    "bpc": "{:.3f}",
    "energy_pj_per_token": "{:,.0f}",
    "energy_ratio_vs_softmax": "{:.2f}",
    "tokens_per_s": "{:,.0f}",
    **{f"energy_ratio_{name}{mem}": "{:.2f}" for name in PRESET_NAMES for mem in ("", "_mem")},
    "dead_frac": "{:.1%}",
    "saturated_frac": "{:.1%}",
}


def _pj_per_byte(records: list[dict]) -> str:
    values = {p["pj_per_byte"] for r in records for p in r["energy"].get("presets", {}).values() if "pj_per_byte" in p}
    return "/".join(f"{v:g}" for v in sorted(values))


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row[c] is None else _MARKDOWN_FORMATS.get(c, "{}").format(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_spiking(records: list[dict]) -> dict | None:
    """The spiking run with the lowest validation perplexity, or None when no run has LIF sites."""
    spiking = [r for r in records if r["firing_rates"]]
    return min(spiking, key=lambda r: r["val_ppl"]) if spiking else None


def raster_png(record: dict) -> bytes:
    """Spike raster of a run over the first RASTER_TOKENS tokens of its validation text."""
    model, tokenizer, _ = load_model(record["checkpoint"])
    data = validation_data(record["checkpoint"], tokenizer, model.config.block_size, record["source"], batches=1)
    sample = np.asarray(data.val_tokens[: min(RASTER_TOKENS, model.config.block_size)], dtype=np.int64)
    trains = spike_trains(model, torch.from_numpy(sample)[None])
    tokens = [tokenizer.decode([t]) for t in sample.tolist()]
    return plots.raster(
        trains,
        tokens,
        model.config.timesteps,
        f"{record['point']}: spikes of sampled neurons (quietest to busiest, bottom to top)",
    )


def _report_md(
    name: str,
    records: list[dict],
    columns: list[str],
    rows: list[dict],
    figures: list[str],
    best: dict | None,
    command: str,
) -> str:
    first = records[0]
    steps = sorted({r["max_steps"] for r in records}, key=str)
    warnings = [line for r in records for line in r["warnings"]]
    lines = [
        f"# Sweep `{name}`: spiking models against the softmax baseline",
        "",
        f"{len(records)} runs, {', '.join(map(str, steps))} training steps each; every checkpoint evaluated on "
        f"{first['windows']} validation windows of {first['block_size']} tokens of `{first['source']}` "
        f"on {first['device']}.",
        "",
        markdown_table(columns, rows),
        "",
        f"- mean_firing_rate: all spikes / all neuron-steps of all LIF sites; bpc: bits per {first['bpc_unit']}.",
        f"- energy: estimated from operation counts (MACs on real values x {first['energy']['e_mac_pj']} pJ, "
        f"spike-triggered ACs x {first['energy']['e_ac_pj']} pJ); neuron updates are not counted. "
        "energy_ratio_fp16 / _int8: the same ratio under Horowitz's 45 nm fp16 (1.5 / 0.4 pJ per MAC / AC) and "
        "int8 (0.23 / 0.03) figures, compute alone"
        + (
            f"; *_mem: each preset with the memory term, bytes read per token x {_pj_per_byte(records)} pJ/byte"
            if has_memory_term(records)
            else "; memory traffic not counted"
        )
        + ". See docs/energy.md for which question each preset answers.",
        f"- tokens_per_s: forward throughput (no grad) on one batch of validation windows, on {first['device']}: "
        f"the best of {throughput.ROUNDS} rounds in which the runs take turns, so that all meet the same load.",
        "- dead / saturated: fraction of neurons that never fired / fired at the refractory limit on every token.",
        "",
    ]
    captions = {
        "frontier": "Left: validation perplexity against the mean firing rate, the softmax baseline dashed, "
        "the Pareto front (no other run has both a lower rate and a lower perplexity) circled. "
        "Right: validation loss against estimated arithmetic energy per token under each 45 nm preset "
        "(fp32, fp16, int8; the memory term, where evaluated, is in the table), the softmax + GELU "
        "baseline's energy under each preset dotted in its colour, with the fp32 Pareto front.",
    }
    if best is not None:
        captions["layers"] = (
            f"Per-site firing rates and neuron health of `{best['point']}`, the spiking run with the lowest perplexity."
        )
        captions["raster"] = f"Spike rasters of `{best['point']}` over the start of the validation text."
    for figure in figures:
        lines += [f"![{figure}]({figure}.png)", "", captions[figure], ""]
    if best is not None:
        lines += [
            "## Model",
            "",
            f"The spiking runs' model settings (`{best['point']}`'s; the others differ only in the swept keys):",
            "",
            "```json",
            json.dumps(best["config"], indent=1),
            "```",
            "",
        ]
    lines += ["## Neuron health warnings", ""]
    lines += [f"- {line}" for line in warnings] or ["None: no site over 50% dead or 20% saturated."]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        "Each run's `spiking-lm fit` command heads its log, `runs/<point>.log`, beside its config "
        "`runs/<point>.yaml`; its evaluation is, from inside this folder,",
        "",
        "```bash",
        f"spiking-lm evaluate --ckpt runs/<point>/checkpoints/last.ckpt --batches {first['batches']}",
        "```",
        "",
    ]
    return "\n".join(lines)


def log_to_wandb(
    out: Path, name: str, project: str, columns: list[str], rows: list[dict], figures: dict[str, Path]
) -> None:
    """The table and figures as a summary run of the sweep's W&B group (offline when W&B is unreachable)."""
    import wandb

    run = init_run(project=project, group=name, name=f"{name}-summary", job_type="sweep-summary", dir=str(out / "runs"))
    try:
        run.log(
            {
                "results": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows]),
                **{figure: wandb.Image(str(path)) for figure, path in figures.items()},
            }
        )
    finally:
        run.finish()


def publish(out: Path, records: list[dict], keys: list[str], command: str, name: str, project: str) -> list[Path]:
    """Write results.csv, the figures and report.md into ``out``, and log them to W&B; the files written.

    Without a run that has LIF sites there is no layers.png or raster.png.
    """
    columns, rows = table(records, keys, throughput.side_by_side([r["checkpoint"] for r in records]))
    write_atomic(out / "results.csv", csv_text(columns, rows))
    best = best_spiking(records)
    pngs = {"frontier": plots.frontier(records, keys)}
    if best is not None:
        pngs["layers"] = plots.layers(best)
        pngs["raster"] = raster_png(best)
    figures = {figure: out / f"{figure}.png" for figure in pngs}
    for figure, path in figures.items():
        write_atomic(path, pngs[figure])
    write_atomic(out / "report.md", _report_md(name, records, columns, rows, list(figures), best, command))
    log_to_wandb(out, name, project, columns, rows, figures)
    return [out / "results.csv", *figures.values(), out / "report.md"]
