"""Whether W&B can run online here, and a run started accordingly: shared by training's logger, ``evaluate --wandb``
and the sweep's summary run."""

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


def init_run(**settings):
    """``wandb.init(**settings)``, offline unless ``wandb_offline`` says W&B can run online here."""
    import wandb

    # mode None leaves W&B to its settings and WANDB_MODE (online, or disabled).
    return wandb.init(mode="offline" if wandb_offline() else None, **settings)
