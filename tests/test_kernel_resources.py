"""eval/kernel_resources.py on known compile results: the rows, the resident warps and the targets' summary."""

import pytest

from spiking_lm.eval.kernel_resources import main, markdown, rows, summary


def result(registers: int, spills: int, shared: int, dtype: str, **counts) -> dict:
    return {
        "signature": {"x_ptr": f"*{dtype}", "n": "i32"},
        "constexprs": {"HS": "64"},
        "num_warps": 4,
        "num_stages": 3,
        "enable_fp_fusion": False,
        "registers": registers,
        "spill_stores": spills,
        "spill_loads": spills,
        "stack_bytes": spills,
        "shared_bytes": shared,
        "cubin_bytes": 1,
        "fma_f32": 0,
        "mul_f32": 1,
        "add_f32": 1,
        "mma": 4,
        "wgmma": 0,
        "tf32_mma": 0,
    } | counts


def test_rows_and_summary():
    builds = [
        {
            "module": "spiking_lm.kernels.spiking_attention",
            "kernel": "_attn_bwd_kernel",
            "workloads": ["hs64-bf16-R1-dropout0"],
        },
        {
            "module": "spiking_lm.kernels.spiking_attention",
            "kernel": "_attn_fwd_kernel",
            "workloads": ["hs64-bf16-R0-dropout0.2"],
        },
        {"module": "spiking_lm.kernels.lif", "kernel": "_lif_fwd_kernel", "workloads": ["lif-op-fp32-R0"]},
    ]
    compiled = [
        result(255, 16, 24 * 1024, "bf16", tf32_mma=2),
        result(128, 0, 8 * 1024, "bf16", fma_f32=3),
        result(40, 0, 0, "fp32", mma=0),
    ]
    table = rows(builds, compiled)
    assert [(r["kernel"], r["dtype"]) for r in table] == [
        ("_lif_fwd_kernel", "fp32"),
        ("_attn_bwd_kernel", "bf16"),
        ("_attn_fwd_kernel", "bf16"),
    ]
    # 255 registers: 8 warps (register-bound); 128 registers: 16 warps (4 blocks of 4); 40 registers, 1 warp
    # allocation of 1280: 12 blocks of 4 warps, 48 warps.
    assert [r["resident_warps"] for r in table] == [48, 8, 16]
    assert summary(table) == [
        "- 3 builds, 0 failing to compile.",
        "- Spilling builds: 1 of 3 (up to 16 B stored per thread).",
        "- Attention builds with FMA: 1 of 2.",
        "- bf16 builds with tf32 mma: 1 of 2.",
        "- Resident warps per SM of the 2 attention builds at head size 64 in bf16: 8 to 16 (target >= 12).",
        "- Attention registers per thread: 128 to 255.",
    ]
    text = markdown({"date": "2026-12-05", "commit": None, "triton": "3.8.0", "rows": table})
    assert "| _attn_bwd_kernel | bf16 | HS=64 | 4 | 3 | 255 | 16/16 | 24.0 | 8 | 0 | 4 (2/0) | hs64-bf16 |" in text
    assert "| _lif_fwd_kernel | fp32 | HS=64 | 4 | 3 | 40 | 0/0 | 0.0 | 48 | 0 | 0 (0/0) | op |" in text


def test_out_must_be_markdown(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "table.txt")])
    assert exit_info.value.code == 2
    assert "--out must name a .md file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
