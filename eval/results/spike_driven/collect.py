"""Evaluate the runs of this folder and write its table and figures with the sweep's report machinery.

    python eval/results/spike_driven/collect.py

The runs are plain ``spiking-lm fit`` runs (their commands head ``runs/<run>.log`` and are listed in
``commands.sh``), trained two at a time rather than one after another as ``spiking-lm sweep`` would, because
they mix 2,000-step runs and 500-step screens. A run that has not finished is left out.
"""

import json
import shlex
import sys
from pathlib import Path

from spiking_lm.checkpoint import read_checkpoint
from spiking_lm.eval import report
from spiking_lm.eval.evaluate import DEFAULT_BATCHES, evaluate
from spiking_lm.files import write_atomic

HERE = Path(__file__).resolve().parent
# (run folder, row label, training steps); the first is the baseline
ROWS = [
    ("softmax_2000", "softmax + GELU", 2000),
    ("default_2000", "spiking default", 2000),
    ("all_2000", "all spike-driven", 2000),
    ("default_500", "spiking default", 500),
    ("qkv_in_500", "default + qkv_in", 500),
    ("fc_in_500", "default + fc_in", 500),
    ("proj_in_500", "default + proj_in", 500),
    ("all_500", "all spike-driven", 500),
    ("all_reg0.3_500", "all spike-driven, rate reg 0.3", 500),
    ("all_reg3_500", "all spike-driven, rate reg 3", 500),
    ("default_distill_500", "default, distilled", 500),
    ("all_distill_500", "all spike-driven, distilled", 500),
]


def record(run: str, label: str, steps: int, baseline: bool) -> dict | None:
    """The run's sweep-style record, evaluated once and cached in ``runs/<run>/done.json``; None if unfinished."""
    run_dir = HERE / "runs" / run
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file() or read_checkpoint(str(checkpoint), mmap=True).get("global_step") != steps:
        return None
    result = evaluate(str(checkpoint), batches=DEFAULT_BATCHES, label=f"{run}: ")
    rec = {"point": run, "settings": {"row": label, "steps": steps}, "baseline": baseline, "max_steps": steps,
           **result}
    write_atomic(done, json.dumps(rec, indent=2) + "\n")
    return rec


def main() -> None:
    records = [r for i, row in enumerate(ROWS) if (r := record(*row, baseline=i == 0)) is not None]
    command = "\n".join([(HERE / "commands.sh").read_text().strip(), shlex.join(["python", *sys.argv])])
    written = report.publish(HERE, records, ["row", "steps"], command, "spike_driven", "spiking-lm")
    print("wrote", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
