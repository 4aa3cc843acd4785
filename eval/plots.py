"""The sweep's figures, drawn on bare ``matplotlib.figure.Figure`` objects (no pyplot state, no display).

Each function takes sweep records (``evaluate`` results plus ``point`` and ``baseline``) or spike
trains and returns the PNG bytes; the caller decides where they go.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.figure import Figure

from spiking_lm.eval.health import DEAD_WARN, SATURATED_WARN

RASTER_NEURONS = 32
# Beyond this many points, or labels this long, a frontier's points carry numbers and a key spells them out.
INLINE_LABELS, INLINE_LABEL_CHARS = 8, 24
FRONT_COLOR, POINT_COLOR, BASE_COLOR = "C3", "C0", "0.35"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower is better), sorted by x."""
    front = [
        i
        for i in range(len(xs))
        if not any(xs[j] <= xs[i] and ys[j] <= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i]) for j in range(len(xs)))
    ]
    return sorted(front, key=lambda i: (xs[i], ys[i]))


def _label(record: dict) -> str:
    """A point's swept values alone (the keys go in the figure's title), or "softmax" for the baseline."""
    return (
        "softmax"
        if record["baseline"]
        else ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in record["settings"].values())
    )


def _draw_front(ax, xs: list[float], ys: list[float], label: str, lw: float, ms: float) -> None:
    """The Pareto front of the points (xs, ys): joined by a line, each circled."""
    front = pareto_front(xs, ys)
    ax.plot(
        [xs[i] for i in front],
        [ys[i] for i in front],
        color=FRONT_COLOR,
        lw=lw,
        zorder=2,
        marker="o",
        ms=ms,
        mfc="none",
        mec=FRONT_COLOR,
        mew=lw,
        label=label,
    )


def _annotate(ax, xs: list[float], ys: list[float], tags: list[str], fontsize: float) -> None:
    # Alternate above and below, so that tags of neighbouring points do not overlap.
    for i, (x, y, tag) in enumerate(zip(xs, ys, tags, strict=True)):
        ax.annotate(tag, (x, y), xytext=(6, 5 if i % 2 else -11), textcoords="offset points", fontsize=fontsize)


def _scatter_with_front(
    ax, records: list[dict], xs: list[float], ys: list[float], tags: list[str], rate_colors: bool = False
) -> None:
    """Points with their Pareto front, each tagged; ``rate_colors`` colours them by mean firing rate (runs without
    spikes grey)."""
    if rate_colors:
        spiking = [i for i, r in enumerate(records) if r["mean_firing_rate"] is not None]
        dense = [i for i in range(len(records)) if i not in spiking]
        ax.scatter([xs[i] for i in dense], [ys[i] for i in dense], c=BASE_COLOR, s=36, zorder=3)
        points = ax.scatter(
            [xs[i] for i in spiking],
            [ys[i] for i in spiking],
            s=36,
            zorder=3,
            cmap="viridis",
            c=[records[i]["mean_firing_rate"] for i in spiking],
            vmin=0,
        )
        ax.figure.colorbar(points, ax=ax, label="mean firing rate")
    else:
        ax.scatter(xs, ys, c=[BASE_COLOR if r["baseline"] else POINT_COLOR for r in records], s=36, zorder=3)
    _draw_front(ax, xs, ys, "Pareto front", lw=1.5, ms=11)
    _annotate(ax, xs, ys, tags, fontsize=8)
    ax.grid(alpha=0.3)


def frontier(records: list[dict], keys: list[str]) -> bytes:
    """``frontier_figure`` as PNG bytes."""
    return _png(frontier_figure(records, keys))


def frontier_figure(records: list[dict], keys: list[str]) -> Figure:
    """Perplexity against mean firing rate (baseline as a line), and val loss against energy per token relative
    to the dense baseline, coloured by mean firing rate.

    Points carry their labels, or, when there are more than ``INLINE_LABELS`` or a label is longer than
    ``INLINE_LABEL_CHARS`` (where labels would overlap), numbers that a key under the plots spells out."""
    labels = [_label(r) for r in records]
    numbered = len(labels) > INLINE_LABELS or max(map(len, labels), default=0) > INLINE_LABEL_CHARS
    tags = [str(n) for n in range(1, len(labels) + 1)] if numbered else labels
    key_lines = -(-len(labels) // 2) if numbered else 0  # the key's two columns
    key_height = 0.16 * key_lines + 0.2 * numbered  # inches
    fig = Figure(figsize=(12, 4.8 + key_height), layout="constrained")
    grid = fig.add_gridspec(1 + numbered, 2, height_ratios=[4.8, key_height] if numbered else None)
    rate_ax, energy_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    fig.suptitle(f"Points {'numbered, key below' if numbered else 'labelled'}: {', '.join(keys)}", fontsize=10)
    if numbered:
        key_ax = fig.add_subplot(grid[1, :])
        key_ax.axis("off")
        entries = [f"{tag:>3}  {label}" for tag, label in zip(tags, labels, strict=True)]
        for column, x in enumerate((0.0, 0.5)):
            text = "\n".join(entries[column * key_lines : (column + 1) * key_lines])
            key_ax.text(x, 1, text, va="top", family="monospace", fontsize=7, transform=key_ax.transAxes)
    spiking = [i for i, r in enumerate(records) if r["mean_firing_rate"] is not None]
    if spiking:
        _scatter_with_front(
            rate_ax,
            [records[i] for i in spiking],
            [records[i]["mean_firing_rate"] for i in spiking],
            [records[i]["val_ppl"] for i in spiking],
            [tags[i] for i in spiking],
        )
    for r in records:
        if r["baseline"]:
            rate_ax.axhline(r["val_ppl"], color=BASE_COLOR, ls="--", label=f"softmax baseline ({r['val_ppl']:.2f})")
    rate_ax.set(
        xlabel="mean firing rate (spikes per neuron-step)",
        ylabel="validation perplexity",
        title="Perplexity vs firing rate",
    )
    rate_ax.legend(fontsize=8, framealpha=0.6)
    _energy_by_preset(energy_ax, records, tags)
    return fig


PRESET_STYLE = {"fp32": ("C0", "o"), "fp16": ("C1", "s"), "int8": ("C2", "^")}


def _energy_by_preset(ax, records: list[dict], tags: list[str]) -> None:
    """Val loss against absolute energy per token under each preset (log x), arithmetic alone (the memory term,
    where evaluated, is in the table), each preset's dense baseline as a dotted line in its colour, so that a
    point left of its line beats the baseline under that preset."""
    losses = [r["val_loss"] for r in records]
    drawn = False
    for name, (color, marker) in PRESET_STYLE.items():
        presets = [r["energy"].get("presets", {}).get(name) for r in records]
        if any(p is None for p in presets):
            continue
        drawn = True
        xs = [(p["pj_per_token"] - p.get("memory_pj_per_token", 0.0)) / 1e6 for p in presets]
        ax.scatter(xs, losses, c=color, marker=marker, s=30, zorder=3, label=name)
        dense = presets[0]["dense_pj_per_token"] - presets[0].get("dense_memory_pj_per_token", 0.0)
        ax.axvline(dense / 1e6, color=color, ls=":", lw=1.2)
        if name == "fp32":
            _draw_front(ax, xs, losses, "fp32 Pareto front", lw=1.0, ms=10)
            _annotate(ax, xs, losses, tags, fontsize=7)
    if not drawn:  # records evaluated before the presets: the ratio under their own e_mac / e_ac
        ratios = [r["energy"]["ratio_vs_dense"] for r in records]
        _scatter_with_front(ax, records, ratios, losses, tags, rate_colors=True)
        ax.axvline(1.0, color=BASE_COLOR, ls=":", lw=1)
        ax.set(
            xlabel="estimated energy per token / softmax + GELU baseline's",
            ylabel="validation loss",
            title="Val loss vs relative energy (grey: no spikes)",
        )
    else:
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set(
            xlabel="estimated arithmetic energy per token (µJ, log); dotted: softmax + GELU per preset",
            ylabel="validation loss",
            title="Val loss vs energy under the 45 nm presets",
        )
    ax.legend(fontsize=8, framealpha=0.6)


def layers(record: dict) -> bytes:
    """Per-site firing rates of one run, above its dead and saturated fractions."""
    sites = list(record["firing_rates"])
    x = np.arange(len(sites))
    fig = Figure(figsize=(max(6.0, 1.1 * len(sites) + 2), 6), layout="constrained")
    rate_ax, health_ax = fig.subplots(2, 1, sharex=True)
    rates = [record["firing_rates"][s] for s in sites]
    bars = rate_ax.bar(x, rates, color=POINT_COLOR)
    rate_ax.bar_label(bars, fmt="%.3f", fontsize=8)
    rate_ax.set(ylabel="firing rate", title=f"{record['point']}: firing rate and neuron health per site")
    rate_ax.margins(y=0.15)
    dead = [record["health"][s]["dead_frac"] for s in sites]
    saturated = [record["health"][s]["saturated_frac"] for s in sites]
    health_ax.bar(x - 0.2, dead, 0.4, color="0.3", label="dead (never fired)")
    health_ax.bar(x + 0.2, saturated, 0.4, color=FRONT_COLOR, label="saturated (at the refractory limit)")
    health_ax.axhline(DEAD_WARN, color="0.3", ls=":", lw=1, label=f"dead warning ({DEAD_WARN:.0%})")
    health_ax.axhline(
        SATURATED_WARN, color=FRONT_COLOR, ls=":", lw=1, label=f"saturated warning ({SATURATED_WARN:.0%})"
    )
    health_ax.set(ylabel="fraction of neurons", ylim=(0, 1.05), xticks=x)
    health_ax.set_xticklabels(sites, rotation=30 if len(sites) > 6 else 0)
    health_ax.legend(fontsize=8, ncols=2)
    return _png(fig)


def _pick_neurons(trains: torch.Tensor, present: torch.Tensor) -> np.ndarray:
    """Up to RASTER_NEURONS neurons evenly spread from the quietest to the busiest, busiest on top."""
    alive = torch.nonzero(present.any(1)).flatten()
    order = alive[torch.argsort(trains[alive].sum(1), stable=True)]
    picks = np.unique(np.linspace(0, len(order) - 1, min(RASTER_NEURONS, len(order))).round().astype(int))
    return order[picks].flip(0).numpy()


def raster(
    trains: dict[str, tuple[torch.Tensor, torch.Tensor]], tokens: list[str], timesteps: int, title: str
) -> bytes:
    """One spike raster per site over a sample text: ``trains`` from ``health.spike_trains``, ``tokens`` its symbols."""
    steps = len(tokens) * timesteps
    fig = Figure(figsize=(max(8.0, 0.22 * len(tokens) + 2), 1.9 * len(trains) + 1), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(trains), 1, sharex=True))
    for ax, (site, (spikes, present)) in zip(axes, trains.items(), strict=True):
        picked = _pick_neurons(spikes, present)
        image = np.ones((len(picked), steps, 3))
        image[~present[picked].numpy()] = 0.88  # no such neuron at this position (attention offset beyond the query)
        image[spikes[picked].numpy() > 0] = 0.0
        ax.imshow(image, aspect="auto", interpolation="nearest", extent=(0, steps, len(picked), 0))
        for boundary in range(timesteps, steps, timesteps):
            ax.axvline(boundary, color="C0", lw=0.3, alpha=0.4)
        ax.set_yticks([])
        ax.set_ylabel(f"{site}\n{len(picked)} of {spikes.shape[0]}", fontsize=8)
    shown = ["\\n" if t == "\n" else "\u2423" if t == " " else t for t in tokens]
    axes[-1].set_xticks(np.arange(len(tokens)) * timesteps + timesteps / 2, shown, fontsize=9, family="monospace")
    axes[-1].set_xlabel(f"input text, one token per {timesteps} timesteps (black: spike; grey: no such neuron yet)")
    axes[0].set_title(title)
    return _png(fig)
