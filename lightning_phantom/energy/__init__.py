"""Measured energy per step: the ``EnergyMonitor`` callback and the meters behind it (NVML, RAPL, estimate)."""

from lightning_phantom.energy.monitor import EnergyMonitor

__all__ = ["EnergyMonitor"]
