"""The Lightning internals ``train/lightning_adapter.py`` relies on: these fail when a Lightning release moves them."""

from __future__ import annotations

from spiking_lm.train.logger import AutoWandbLogger


def test_wandb_logger_passes_no_anonymous_setting(tmp_path):
    logger = AutoWandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" not in logger._wandb_init  # W&B warns "the anonymous setting has no effect" otherwise
    assert logger.save_dir == str(tmp_path)
