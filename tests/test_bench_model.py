"""eval/bench_model.py at a tiny size on CPU: every row trains and the JSON holds it; the ratios on known rows."""

import json

import pytest

from spiking_lm.eval.bench_model import ROWS, add_ratios, main

TINY = [
    "--device",
    "cpu",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "8",
    "--batch-size",
    "2",
    "--timesteps",
    "2",
    "--warmup",
    "1",
    "--steps",
    "1",
    "--rounds",
    "2",
    "--no-compile",
]


def test_rows_and_json(tmp_path):
    out = tmp_path / "bench.json"
    report = main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert {"device", "date", "commit", "rows"} <= report.keys()
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == list(ROWS)
    # Every row runs here, the fused one under the Triton interpreter (conftest sets it).
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["step_ratio_vs_softmax"] > 0, row
        assert row["peak_mem_bytes"] is None and "mem_ratio_vs_softmax" not in row  # CPU: no allocator stats


def test_ratios_are_relative_to_the_first_row():
    rows = add_ratios(
        [
            {"ms_per_step": 10.0, "peak_mem_bytes": 100},
            {"ms_per_step": 25.0, "peak_mem_bytes": 300},
            {"skipped": "no kernels"},
            {"ms_per_step": 5.0, "peak_mem_bytes": None},
        ]
    )
    assert [row.get("step_ratio_vs_softmax") for row in rows] == [1.0, 2.5, None, 0.5]
    assert [row.get("mem_ratio_vs_softmax") for row in rows] == [1.0, 3.0, None, None]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "softmax-gelu,flash"], "--rows: unknown ['flash']"),
        (["--n-head", "3"], "n_embd (16) must be divisible by n_head (3)"),
        (["--steps", "0"], "must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, *args, "--out", str(tmp_path / "bench.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()
