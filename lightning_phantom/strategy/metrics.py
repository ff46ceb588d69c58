"""torchmetrics over the data-parallel group.

The ranks of one phantom group see the same batch and compute the same outputs, so a
``Metric`` synced over the whole world would count every batch once per phantom rank
(a sum p times too large; a mean right only by luck of equal weights). Syncing over the
data-parallel group counts each batch once, as on one process. The strategy's ``reduce``
and ``all_gather`` (behind ``self.log(..., sync_dist=True)``) default to that group too.
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.distributed import ProcessGroup


def sync_metrics_over(module: nn.Module, group: Optional[ProcessGroup]) -> list[str]:
    """Make every torchmetrics ``Metric`` in ``module`` sync over ``group``; returns their names.

    A metric whose ``process_group`` the user set is left alone.
    """
    try:
        from torchmetrics import Metric
    except ImportError:  # no torchmetrics, no metrics to point anywhere
        return []
    names = []
    for name, metric in module.named_modules():
        if isinstance(metric, Metric) and metric.process_group is None:
            metric.process_group = group
            names.append(name)
    return names
