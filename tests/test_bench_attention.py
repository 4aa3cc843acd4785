"""eval/bench_attention.py: its ratios and target checks on known rows, and the attention-only scope on CPU."""

import json

import pytest

from spiking_lm.eval import bench_attention
from spiking_lm.eval.bench_attention import ISSUE16, ROWS, add_ratios, check_targets


def row(name: str, L: int, ms: float, mem: int | None = None) -> dict:
    return {"name": name, "L": L, "fwd_bwd_ms": ms, "peak_mem_bytes": mem}


def test_ratios_compare_rows_at_the_same_length():
    rows = [
        row("unfused", 256, 8.0, 800),
        row("fused", 256, 2.0, 100),
        row("sdpa-xS", 256, 0.5, 50),
        row("fused", 1024, 6.0),
        row("sdpa-xS", 1024, 4.0),
        {"name": "unfused", "L": 1024, "error": "OOM"},
    ]
    add_ratios(rows)
    unfused, fused, sdpa, fused_1k, sdpa_1k, failed = rows
    assert fused["speedup_vs_unfused"] == 4.0 and fused["memory_vs_unfused"] == 1 / 8
    assert fused["time_vs_sdpa"] == 4.0 and unfused["time_vs_sdpa"] == 16.0 and sdpa["speedup_vs_unfused"] == 16.0
    assert unfused["speedup_vs_unfused"] == 1.0 and sdpa["time_vs_sdpa"] == 1.0
    # At L 1024 the unfused row failed: no speedup, but the sdpa ratio stands.
    assert "speedup_vs_unfused" not in fused_1k and fused_1k["time_vs_sdpa"] == 1.5
    assert "time_vs_sdpa" not in failed and sdpa_1k["time_vs_sdpa"] == 1.0


def test_targets_are_judged_only_at_their_setting():
    rows = [row("unfused", 256, 10.0), row("fused", 256, 2.6), row("fused", 1024, 6.0), row("sdpa-xS", 1024, 2.0)]
    results = {(t["issue"], t["text"]): t for t in check_targets(rows, ISSUE16)}
    three_x = results[16, "fused fwd+bwd <= 3x S x sdpa"]
    moonshot = results[16, "moonshot: fused fwd+bwd <= 1.5x S x sdpa"]
    assert three_x["ratio"] == 3.0 and three_x["met"] is True
    assert moonshot["ratio"] == 3.0 and moonshot["met"] is False
    speedup = results[16, "fused >= 4x faster than unfused"]
    assert speedup["ratio"] == pytest.approx(0.26) and speedup["met"] is False  # 3.85x, short of 4x
    # Issue 11's targets were set for the whole layer at batch 64: not measured by this run.
    assert all(t["ratio"] is None and t["met"] is None for (issue, _), t in results.items() if issue == 11)
    # At another batch nothing is judged.
    assert all(t["ratio"] is None for t in check_targets(rows, ISSUE16 | {"batch": 8}))


def test_attention_only_scope_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    report = bench_attention.main(
        [
            "--device",
            "cpu",
            "--scope",
            "core",
            "--batch",
            "1",
            "--heads",
            "2",
            "--head-size",
            "16",
            "--blocks",
            "16",
            "--precision",
            "32",
            "--budget_ms",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == set(ROWS) and all(r["fwd_bwd_ms"] > 0 for r in rows.values()), rows
    assert rows["fused"]["time_vs_sdpa"] == pytest.approx(rows["fused"]["fwd_bwd_ms"] / rows["sdpa-xS"]["fwd_bwd_ms"])
    assert report["scope"] == "core" and report["targets"] == []  # CPU timings judge no GPU target
    assert json.loads(out.read_text()) == report


def test_unknown_scope_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.main(["--device", "cpu", "--scope", "kernel", "--out", str(tmp_path / "b.json")])
    assert exit_info.value.code == 2
    assert "--scope: invalid choice: 'kernel'" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
