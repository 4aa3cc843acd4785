"""What a run prints: messages from libraries that spiking-lm cannot fix, filtered by their exact text.

Each filter names the upstream cause; remove it when that library changes.
"""

from __future__ import annotations

import logging
import re
import warnings

# Lightning's own copy of torch's tree flattening (lightning/pytorch/utilities/_pytree.py) still asks
# `isinstance(spec, LeafSpec)`, which torch deprecates (2.14 here) with this warning at every fit.
LEAFSPEC = (
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and"
    " treespec.is_leaf()` instead."
)

# Lightning 2.6 advertises its LitLogger and LitModelCheckpoint (for its cloud platform) at every fit whose
# loggers or checkpoint callbacks are others (trainer/connectors/logger_connector.py, callback_connector.py).
TIPS = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(TIPS)


def quiet_upstream() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings("ignore", message=re.escape(LEAFSPEC))
    # Lightning logs through a handler it puts on its top-level loggers; the tips reach it from submodules.
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if _not_a_tip not in handler.filters:
                handler.addFilter(_not_a_tip)
