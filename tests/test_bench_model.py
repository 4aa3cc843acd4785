"""Smoke test of eval/bench_model.py at a tiny size on CPU: every row trains, the ratios and the JSON add up."""

import json

import pytest

from spiking_lm.eval.bench_model import ROWS, main

TINY = ["--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--timesteps", "2", "--warmup", "1", "--steps", "1", "--rounds", "2", "--no-compile"]


def test_rows_ratios_and_json(tmp_path):
    out = tmp_path / "bench.json"
    report = main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert {"device", "date", "commit", "rows"} <= report.keys()
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == list(ROWS)
    measured = [row for row in rows.values() if "ms_per_step" in row]
    assert [row["name"] for row in measured][:3] == ["softmax-gelu", "softmax-lif", "spiking-lif-unfused"]
    base = rows["softmax-gelu"]
    for row in measured:
        assert row["ms_per_step"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 8 / row["ms_per_step"] * 1e3)
        assert row["step_ratio_vs_softmax"] == pytest.approx(row["ms_per_step"] / base["ms_per_step"])
        assert row["peak_mem_bytes"] is None and "mem_ratio_vs_softmax" not in row  # CPU: no allocator stats
    fused = rows["spiking-lif-fused"]
    assert "ms_per_step" in fused or "spiking_attention" in fused["skipped"]


@pytest.mark.parametrize("args, message", [
    (["--rows", "softmax-gelu,flash"], "--rows: unknown ['flash']"),
    (["--n-head", "3"], "n_embd (16) must be divisible by n_head (3)"),
    (["--steps", "0"], "must be an integer >= 1, got 0"),
])
def test_bad_arguments(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, *args, "--out", str(tmp_path / "bench.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()
