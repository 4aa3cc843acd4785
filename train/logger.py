"""W&B logging that falls back to offline mode by itself."""

from __future__ import annotations

import netrc
import os
import socket

from lightning.pytorch.loggers import WandbLogger

WANDB_HOST = "api.wandb.ai"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_offline() -> bool:
    """Offline unless W&B credentials exist and its server answers; ``WANDB_MODE`` overrides both."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun")
    return not (_has_credentials() and _reachable(WANDB_HOST))


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` whose ``offline`` defaults to what the machine allows.

    Offline runs land in ``<save_dir>/wandb/offline-run-*``; upload them later with
    ``wandb sync <that folder>``.
    """

    def __init__(
        self,
        project: str = "spiking-lm",
        name: str | None = None,
        save_dir: str = "runs",
        tags: list[str] | None = None,
        group: str | None = None,
        offline: bool | None = None,
        **kwargs,
    ):
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            project=project, name=name, save_dir=save_dir, tags=tags, group=group,
            offline=wandb_offline() if offline is None else offline, **kwargs,
        )
