"""Evaluate the runs of this folder and write its table and figures with the sweep's report machinery.

    python eval/results/spike_driven/collect.py            # issue 12's rows, into this folder
    python eval/results/spike_driven/collect.py codes      # issue 17's spike-code screens, into codes/

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


# Issue 17: spike codes and gradient estimators at the three spike-driven sites, 500-step screens, compared with
# issue 12's binary all_500 (val 2.470, README); commands in codes/commands.sh.
# The milestone configuration (configs/cpu_proxy_spike_driven.yaml), which the last rows vary.
MILESTONE = "graded (max 3), surrogate, distilled w 0.9, sites from step 1000"
CODE_ROWS = [
    ("signed_st_500", "signed, straight-through", 500),
    ("graded_st_500", "graded (max 3), straight-through", 500),
    ("graded_st_r0_lr_500", "graded (max 3), straight-through, refractory 0, neuron lr 1e-2", 500),
    ("graded_sg_500", "graded (max 3), surrogate", 500),
    ("graded_st_mlp05_500", "graded (max 3), straight-through, MLP threshold 0.5", 500),
    ("graded_st_thr05_500", "graded (max 3), straight-through, site thresholds 0.5", 500),
    ("graded_st_qk_500", "graded (max 3), straight-through, spiking Q/K/V", 500),
    ("graded_st_2000", "graded (max 3), straight-through", 2000),
    ("graded_st_2000_seed1338", "graded (max 3), straight-through, seed 1338", 2000),
    ("graded_sg_2000", "graded (max 3), surrogate", 2000),
    # Session of 2026-12-06, second half: refractory, resolution, amplitude, learning rate, distillation and the
    # site curriculum on the graded code with the surrogate; softmax_2000 is the distillation teacher.
    ("softmax_2000", "softmax + GELU (the teacher)", 2000),
    ("graded_sg_r0_500", "graded (max 3), surrogate, refractory 0", 500),
    ("graded_sg_fine_500", "graded (max 7), surrogate, site thresholds 0.5", 500),
    ("graded_sg_r0_amp_500", "graded (max 3), surrogate, refractory 0, learned amplitude", 500),
    ("graded_sg_r0_lr2_500", "graded (max 3), surrogate, refractory 0, lr 2e-3", 500),
    ("graded_sg_kd_500", "graded (max 3), surrogate, distilled w 0.5", 500),
    ("graded_sg_kdt2_500", "graded (max 3), surrogate, distilled w 0.5 T 2", 500),
    ("graded_sg_kd9_500", "graded (max 3), surrogate, distilled w 0.9", 500),
    ("graded_sg_kd_cur250_500", "graded (max 3), surrogate, distilled w 0.5, sites from step 250", 500),
    ("graded_sg_cur250_500", "graded (max 3), surrogate, sites from step 250", 500),
    ("graded_sg_kd9_cur1000_2000", MILESTONE, 2000),
    (
        "graded_sg_kd9_cur1000_2000_seed1338",
        f"{MILESTONE}, seed 1338",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_qk_2000",
        f"{MILESTONE}, spiking Q/K/V",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_reg1_2000",
        f"{MILESTONE}, rate reg 1 (target 0)",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_reg03_2000",
        f"{MILESTONE}, rate reg 0.3 (target 0)",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_reg06_2000",
        f"{MILESTONE}, rate reg 0.6 (target 0)",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_reg01_2000",
        f"{MILESTONE}, rate reg 0.1 (target 0)",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_reg01_2000_seed1338",
        f"{MILESTONE}, rate reg 0.1 (target 0), seed 1338",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_reg02_2000",
        f"{MILESTONE}, rate reg 0.2 (target 0)",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_reg02_2000_seed1338",
        f"{MILESTONE}, rate reg 0.2 (target 0), seed 1338",
        2000,
    ),
    (
        "graded_sg_kd9_cur1000_qkcur_2000",
        "graded (max 3), surrogate, distilled w 0.9, sites and spiking Q/K/V from step 1000",
        2000,
    ),
]
SETS = {"": (ROWS, HERE), "codes": (CODE_ROWS, HERE / "codes")}
# The memory term of issue 17's rows: a 32-bit DRAM read, 640 pJ (EIE, Table I), per byte.
DRAM_PJ_PER_BYTE = 160.0


def record(run: str, label: str, steps: int, baseline: bool, memory_pj_per_byte: float | None = None) -> dict | None:
    """The run's sweep-style record, evaluated once and cached in ``runs/<run>/done.json``; None if unfinished."""
    run_dir = HERE / "runs" / run
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file() or read_checkpoint(str(checkpoint), mmap=True).get("global_step") != steps:
        return None
    result = evaluate(str(checkpoint), batches=DEFAULT_BATCHES, label=f"{run}: ", memory_pj_per_byte=memory_pj_per_byte)
    rec = {"point": run, "settings": {"row": label, "steps": steps}, "baseline": baseline, "max_steps": steps, **result}
    write_atomic(done, json.dumps(rec, indent=2) + "\n")
    return rec


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in SETS:
        sys.exit(f"collect.py: unknown set {name!r}; one of {', '.join(repr(k) for k in SETS)}")
    rows, out = SETS[name]
    memory = DRAM_PJ_PER_BYTE if name == "codes" else None
    records = [
        r
        for i, row in enumerate(rows)
        if (r := record(*row, baseline=i == 0 and not name, memory_pj_per_byte=memory)) is not None
    ]
    if not records:
        sys.exit("collect.py: no finished run of this set yet")
    command = "\n".join([(out / "commands.sh").read_text().strip(), shlex.join(["python", *sys.argv])])
    written = report.publish(
        out, records, ["row", "steps"], command, f"spike_driven{name and '_' + name}", "spiking-lm"
    )
    print("wrote", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
