"""What a step costs: the analytic model (PP and Megatron TP) and the counters that check it."""

from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode
from lightning_phantom.cost.model import (
    Comparison, DataAxisCost, LayerCost, StepCost, compare, data_axis_cost, phantom_cost, tp_cost,
)
from lightning_phantom.cost.transformer import StackComparison, StackCost, compare_stacks, stack_cost

__all__ = ["CommCounter", "Comparison", "DataAxisCost", "LayerCost", "LocalFlopCounterMode", "StepCost",
           "StackComparison", "StackCost", "compare", "compare_stacks", "data_axis_cost", "phantom_cost",
           "stack_cost", "tp_cost"]
