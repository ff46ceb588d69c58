"""What the app's terminal does not show: lines that are not about the run.

Each is silenced at its source and by its exact text, so every other warning and log line still
shows:

* Lightning's advertisements (``💡 Tip: …`` for litlogger and litmodels), logged through its
  rank-zero logger at every ``Trainer`` that has no LitLogger;
* the ``FutureWarning`` torch 2.13 raises, once per rank, when Lightning's own ``_pytree`` helper
  builds a ``LeafSpec``: a note to Lightning's developers about Lightning's code.

(Hydra's "… is powered by Hydra" ``--help`` header is replaced in ``conf/config.yaml``.)
"""

from __future__ import annotations

import logging
import warnings

_ADVERTISED = ("pypi.org/project/litlogger", "pypi.org/project/litmodels")
# Lightning logs through whichever of these its rank_zero module was last pointed at.
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("💡 Tip:") and any(site in message for site in _ADVERTISED))


def silence_known_noise() -> None:
    """Install the filters (idempotent); a process of the app calls it first thing."""
    for name in _RANK_ZERO_LOGGERS:
        log = logging.getLogger(name)
        if _not_an_advertisement not in log.filters:
            log.addFilter(_not_an_advertisement)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
