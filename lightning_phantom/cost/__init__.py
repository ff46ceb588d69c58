"""What a step costs: the analytic model (PP and Megatron TP) and the counters that check it."""

from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode
from lightning_phantom.cost.data_axis import DataAxisCost, data_axis_cost
from lightning_phantom.cost.model import (
    Comparison, LayerCost, StepCost, accumulation_size, compare, phantom_cost, tp_cost,
)
from lightning_phantom.cost.transformer import StackComparison, StackCost, compare_stacks, stack_cost

__all__ = ["CommCounter", "Comparison", "DataAxisCost", "LayerCost", "LocalFlopCounterMode", "StepCost",
           "StackComparison", "StackCost", "accumulation_size", "compare", "compare_stacks", "data_axis_cost",
           "phantom_cost", "stack_cost", "tp_cost"]
