"""Committed configs, parsed by fit's own parser: the GPT-2-small pair (and the model each describes, built without
data) and the spike-driven proxy's milestone settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fails

from spiking_lm.config import ModelConfig
from spiking_lm.model import GPT
from spiking_lm.train.cli import SpikingLMCLI, lightning_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPT2_VOCAB = 50257


class _ParseOnly(SpikingLMCLI):
    """fit's parser, without building anything (the data would need the network)."""

    def instantiate_classes(self) -> None:
        pass


def _parse(path: Path):
    """The config ``path`` as fit's parser reads it."""
    return lightning_cli(
        ["--config", str(path)], cli_class=_ParseOnly, run=False, parser_kwargs={"exit_on_error": False}
    ).config


@pytest.mark.parametrize(
    "variant, attention, mlp, params",
    [
        ("softmax", "softmax", "gelu", 124_337_664),
        ("spiking", "spiking", "lif", 124_374_672),
    ],
)
def test_gpt2_small_configs_parse(tmp_path, monkeypatch, variant, attention, mlp, params):
    monkeypatch.chdir(tmp_path)
    path = CONFIGS / f"gpt2_small_{variant}.yaml"
    cfg = _parse(path)
    gpt = cfg.model.gpt
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd, gpt.block_size) == (12, 12, 768, 1024)
    assert (gpt.attention, gpt.mlp_activation) == (attention, mlp)
    assert cfg.data.block_size == 1024 and cfg.data.tokenizer == "gpt2"
    assert cfg.trainer.precision == "bf16-mixed"
    header = path.read_text().split("\nseed_everything")[0]
    assert "memory: unmeasured" in header and "tokens/s: unmeasured" in header
    with torch.device("meta"):  # the sizes the header states, without allocating 124M parameters
        model = GPT(ModelConfig(**{**gpt.as_dict(), "vocab_size": GPT2_VOCAB}))
    assert model.num_params() == params and f"{params / 1e6:.1f}M" in header


def test_spike_driven_proxy_needs_its_teacher(tmp_path, monkeypatch, capsys):
    """Issue 17's milestone configuration distils from the softmax proxy's run, and says so when it is missing."""
    monkeypatch.chdir(tmp_path)
    path = CONFIGS / "cpu_proxy_spike_driven.yaml"
    cfg = _parse(path)
    assert [cfg.model.gpt[f"{site}_neuron"].code for site in ("qkv_in", "proj_in", "fc_in")] == ["graded"] * 3
    assert cfg.model.gpt.proj_in_neuron.threshold == 0.1  # the site's own default survives the partial override
    assert cfg.model.curriculum.sites_from_step == 1000 and cfg.model.distill.weight == 0.9
    status, err = fails(capsys, ["fit", "--config", str(path), "--trainer.logger", "false"])
    assert (
        status != 0
        and "model.distill.teacher: checkpoint not found: runs/cpu_proxy_softmax/checkpoints/last.ckpt" in err
    )
    assert not any(tmp_path.iterdir())
