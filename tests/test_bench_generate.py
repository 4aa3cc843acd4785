"""Smoke test of eval/bench_generate.py at the quickstart size on CPU: both modes sample, the JSON adds up."""

import json

import pytest

from spiking_lm.eval.bench_generate import main


def test_rows_and_json(tmp_path):
    out = tmp_path / "bench.json"
    report = main(
        ["--sizes", "quickstart", "--new-tokens", "20", "--warmup-tokens", "2", "--rounds", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == report and report["clock"] == "time.process_time"
    assert [(row["size"], row["model"]) for row in report["rows"]] == [
        ("quickstart", "softmax"),
        ("quickstart", "spiking"),
    ]
    for row in report["rows"]:
        assert row["cached_tokens_per_s"] > 0 and row["uncached_tokens_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["cached_tokens_per_s"] / row["uncached_tokens_per_s"])
        # A cached token runs the linear layers on a row and more, so the floor is never slower than it.
        assert row["cached_tokens_per_s"] < row["linear_floor_tokens_per_s"]
        assert row["speedup_bound"] == pytest.approx(row["linear_floor_tokens_per_s"] / row["uncached_tokens_per_s"])
        assert row["same_tokens"] == (row["first_difference"] is None)


def test_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--sizes", "gpt2", "--out", str(tmp_path / "bench.json")])
    assert exit_info.value.code == 2 and "--sizes: unknown ['gpt2']" in capsys.readouterr().err
