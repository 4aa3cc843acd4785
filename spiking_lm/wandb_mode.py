"""Whether W&B can run online here: shared by training's logger and the sweep's summary run."""

from __future__ import annotations

import netrc
import os
import socket

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
