"""Energy meters behind :class:`lightning_phantom.energy.EnergyMonitor`.

A meter answers one question: how many joules has *this rank's share* of the hardware used
since ``start()``? ``read()`` returns that cumulative figure, so the callback gets a step's
energy as the difference of two reads and the reads can never drift from the total. A rank
whose share is nothing (a second rank on the same GPU, any rank but local rank 0 for the
node-wide RAPL counters) has ``counts = False`` and reads 0, which is what makes the sum over
ranks count every device once.

Three kinds, modelled on Megatron-core's ``EnergyMonitor`` and Zeus's ``ZeusMonitor``:

- ``NvmlMeter``: the GPU's cumulative energy counter (mJ), read after synchronising the
  device; power x time for windows the counter has not covered yet; sampled power integrated
  over time on GPUs without the counter.
- ``RaplMeter``: CPU package and DRAM counters (uJ) under ``/sys/class/powercap``.
- ``EstimateMeter``: process CPU time x an assumed power per core; not a measurement.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class EstimateMeter:
    """CPU time of this process x ``watts_per_core``: a stand-in where no sensor exists.

    ``time.process_time`` counts user + system time of every thread of the process, so
    intra-op threads are included; DataLoader worker processes are not.
    """

    kind = "estimate"

    def __init__(self, watts_per_core: float, cpu_time: Callable[[], float] = time.process_time) -> None:
        self.watts_per_core = watts_per_core
        self.counts = True
        self._cpu_time = cpu_time
        self._start_s = 0.0

    def start(self) -> None:
        self._start_s = self._cpu_time()

    def read(self) -> float:
        return (self._cpu_time() - self._start_s) * self.watts_per_core

    def close(self) -> None:
        pass


# Package zones only: "intel-rapl-mmio:N" duplicates a package through MMIO and would count it
# twice. Their "core"/"uncore" subzones are part of the package; "dram" is not, so it is added.
_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")
_SUBZONE = re.compile(r"intel-rapl:\d+:\d+")


def _read_int(path: Path) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _zone_name(zone: Path) -> str:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return ""


def find_rapl_zones(powercap_root: str | os.PathLike) -> list[Path]:
    """Zones whose sum is the node's CPU package + DRAM energy, each counted once."""
    root = Path(powercap_root)
    if not root.is_dir():
        return []
    zones = []
    for package in sorted(p for p in root.iterdir() if _PACKAGE_ZONE.fullmatch(p.name)):
        # "psys" (platform) already contains the packages: adding it would count them twice.
        if _zone_name(package) == "psys":
            continue
        zones.append(package)
        zones += sorted(
            sub for sub in package.iterdir() if _SUBZONE.fullmatch(sub.name) and _zone_name(sub) == "dram"
        )
    return zones


def rapl_unavailable_reason(powercap_root: str | os.PathLike) -> str | None:
    """Why RAPL cannot be read under ``powercap_root``, or None when it can."""
    zones = find_rapl_zones(powercap_root)
    if not zones:
        return f"no intel-rapl:N zones under {powercap_root}"
    for zone in zones:
        try:
            _read_int(zone / "energy_uj")
            _read_int(zone / "max_energy_range_uj")
        except PermissionError:
            # Linux made energy_uj root-only (CVE-2020-8694).
            return f"{zone / 'energy_uj'} is not readable by this user (it is root-only since Linux 5.10)"
        except (OSError, ValueError) as err:
            return f"{zone / 'energy_uj'} cannot be read ({err})"
    return None


class RaplMeter:
    """CPU package + DRAM energy of the whole node, read by local rank 0 only."""

    kind = "rapl"

    def __init__(self, powercap_root: str | os.PathLike, counts: bool = True) -> None:
        self.counts = counts
        self._zones: list[Path] = []
        self._max_uj: list[int] = []
        self._last_uj: list[int] = []
        self._total_uj = 0
        if not counts:
            return
        reason = rapl_unavailable_reason(powercap_root)
        if reason is not None:
            raise RuntimeError(
                f"meter='rapl' cannot read CPU energy: {reason}. Run as root, make energy_uj readable "
                "(chmod o+r), pass the right powercap_root, or use meter='estimate'."
            )
        self._zones = find_rapl_zones(powercap_root)
        self._max_uj = [_read_int(zone / "max_energy_range_uj") for zone in self._zones]

    def start(self) -> None:
        self._total_uj = 0
        self._last_uj = [_read_int(zone / "energy_uj") for zone in self._zones]

    def read(self) -> float:
        for i, zone in enumerate(self._zones):
            now_uj = _read_int(zone / "energy_uj")
            # The counter restarts from 0 after max_energy_range_uj; one wrap per read is all that
            # can happen, since a read per training step is far shorter than a wrap (minutes).
            delta = now_uj - self._last_uj[i]
            if delta < 0:
                delta += self._max_uj[i]
            self._total_uj += delta
            self._last_uj[i] = now_uj
        return self._total_uj / 1e6

    def close(self) -> None:
        pass


_NVML_FIX = ("check that the NVIDIA driver is loaded and that this user may read the GPU's power "
             "(nvidia-smi -q -d POWER), or use meter='auto', 'rapl' or 'estimate'")


class NvmlUnavailable(RuntimeError):
    """NVML failed: the message says which call, NVML's own error, and what to do."""


def _nvml_call(nvml: Any, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, an ``NVMLError`` of any kind turned into an ``NvmlUnavailable`` that says
    what was being done, NVML's reason and how to fix it."""
    try:
        return fn(*args)
    except nvml.NVMLError as err:
        raise NvmlUnavailable(f"NVML could not {what}: {_describe(err)}; {_NVML_FIX}") from err


def _describe(err: Exception) -> str:
    name = type(err).__name__
    if name == "NVMLError_NoPermission":
        return f"{name} ({err}): this user may not query the GPU"
    return f"{name} ({err})"


def load_nvml(nvml: Any = None) -> Any:
    """The ``pynvml`` module (from nvidia-ml-py), initialised; imported lazily so CPU runs never need it."""
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as err:
            raise RuntimeError(
                "meter='nvml' needs the pynvml module: pip install nvidia-ml-py (or use meter='auto')"
            ) from err
    _nvml_call(nvml, "start (nvmlInit)", nvml.nvmlInit)
    return nvml


def _uuid(nvml: Any, handle: Any) -> str:
    uuid = _nvml_call(nvml, "read a GPU's UUID", nvml.nvmlDeviceGetUUID, handle)
    return uuid.decode() if isinstance(uuid, bytes) else uuid


def bare_uuid(uuid: str) -> str:
    """The hex digits of a GPU UUID: NVML and CUDA_VISIBLE_DEVICES write ``GPU-8d7c…`` (``MIG-…``
    for a MIG instance), torch's device properties ``8d7c…``."""
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if uuid.startswith(prefix):
            return uuid[len(prefix):]
    return uuid


def nvml_device_handle(nvml: Any, torch_index: int, visible_devices: str | None,
                       torch_uuid: str | None = None) -> Any:
    """NVML handle of the GPU that torch calls ``cuda:<torch_index>``.

    By ``torch_uuid`` (``torch.cuda.get_device_properties(i).uuid``) when known: CUDA numbers
    devices fastest first by default (``CUDA_DEVICE_ORDER=FASTEST_FIRST``) and NVML by PCI bus,
    so on a node with mixed GPUs an index, even one from CUDA_VISIBLE_DEVICES, can name another
    GPU in NVML. Without it, CUDA_VISIBLE_DEVICES is followed: its entries are indices or (prefixes
    of) GPU UUIDs, right when all GPUs are alike or ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    """
    if torch_uuid:
        return _handle_by_uuid(nvml, torch_index, torch_uuid, visible_devices)
    if visible_devices is None:
        return _nvml_call(nvml, f"open GPU {torch_index}", nvml.nvmlDeviceGetHandleByIndex, torch_index)
    entries = [entry.strip() for entry in visible_devices.split(",") if entry.strip()]
    if not 0 <= torch_index < len(entries):
        raise ValueError(
            f"torch uses cuda:{torch_index} but CUDA_VISIBLE_DEVICES={visible_devices!r} makes "
            f"{len(entries)} GPU(s) visible; fix CUDA_VISIBLE_DEVICES or the Trainer's devices"
        )
    entry = entries[torch_index]
    if entry.isdigit():
        return _nvml_call(nvml, f"open GPU {entry}", nvml.nvmlDeviceGetHandleByIndex, int(entry))
    if entry.startswith("MIG-"):
        # MIG instances are not enumerated by nvmlDeviceGetCount; NVML needs the full UUID.
        return _nvml_call(nvml, f"open MIG instance {entry}", nvml.nvmlDeviceGetHandleByUUID, entry)
    if entry.startswith("GPU-"):
        # CUDA accepts any unique prefix of a UUID, so match prefixes, not whole strings.
        handles, known = _all_gpus(nvml)
        matches = [h for h, uuid in zip(handles, known) if uuid.startswith(entry)]
        if len(matches) == 1:
            return matches[0]
        problem = "matches no GPU" if not matches else f"matches {len(matches)} GPUs"
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r} (for cuda:{torch_index}) {problem}; "
            f"GPUs on this node: {known}. Give a unique UUID prefix or a physical index."
        )
    raise ValueError(
        f"CUDA_VISIBLE_DEVICES entry {entry!r} (for cuda:{torch_index}) is neither a physical index "
        "nor a GPU-/MIG- UUID; fix CUDA_VISIBLE_DEVICES"
    )


def _all_gpus(nvml: Any) -> tuple[list[Any], list[str]]:
    """Handles and UUIDs of every GPU NVML enumerates, in NVML's (PCI bus) order."""
    count = _nvml_call(nvml, "count the GPUs", nvml.nvmlDeviceGetCount)
    handles = [_nvml_call(nvml, f"open GPU {i}", nvml.nvmlDeviceGetHandleByIndex, i) for i in range(count)]
    return handles, [_uuid(nvml, h) for h in handles]


def _handle_by_uuid(nvml: Any, torch_index: int, torch_uuid: str, visible_devices: str | None) -> Any:
    wanted = bare_uuid(torch_uuid)
    handles, known = _all_gpus(nvml)
    for handle, uuid in zip(handles, known):
        if bare_uuid(uuid) == wanted:
            return handle
    # A MIG instance is not enumerated by index; NVML finds it by its full UUID.
    for prefix in ("MIG-", "GPU-"):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(prefix + wanted)
        except nvml.NVMLError:
            pass
    raise ValueError(
        f"torch's cuda:{torch_index} is the GPU with UUID {torch_uuid} (CUDA_VISIBLE_DEVICES="
        f"{visible_devices!r}), but NVML knows no such GPU; it lists {known}. NVML and CUDA must see the "
        "same driver: run on the node itself (not in a container that hides NVML devices), or use "
        "meter='auto', 'rapl' or 'estimate'."
    )


def counted_once(device_keys: Sequence[str]) -> list[bool]:
    """For each rank, whether it counts its device: only the lowest rank on each device does."""
    seen: set[str] = set()
    first = []
    for key in device_keys:
        first.append(key not in seen)
        seen.add(key)
    return first


class NvmlMeter:
    """Energy of one GPU through NVML, in the manner of Zeus's ``ZeusMonitor``.

    With the cumulative counter (Volta and newer) the counter is the truth. It only moves
    every update period (tens of ms), so a shorter step would read a false 0 J: such a window
    is credited power x time instead, and that credit is paid back from the counter's next
    increase, which covers the same joules. Without the counter, power samples taken at every
    read are integrated with the trapezoid rule.
    """

    kind = "nvml"

    def __init__(
        self,
        nvml: Any,
        handle: Any,
        sync: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.counts = True
        self.uuid = _uuid(nvml, handle)
        self._nvml = nvml
        self._handle = handle
        self._sync = sync
        self._clock = clock
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.has_counter = True
        except nvml.NVMLError_NotSupported:
            self.has_counter = False
            try:
                nvml.nvmlDeviceGetPowerUsage(handle)
            except nvml.NVMLError as err:
                raise NvmlUnavailable(
                    f"GPU {self.uuid} reports neither total energy nor power through NVML ({_describe(err)}); "
                    "use meter='rapl' or meter='estimate'"
                ) from err
        except nvml.NVMLError as err:  # no permission, GPU lost, driver gone, ...
            raise NvmlUnavailable(f"NVML could not read the energy counter of GPU {self.uuid}: "
                                  f"{_describe(err)}; {_NVML_FIX}") from err
        self._total_J = 0.0
        self._unconfirmed_J = 0.0
        self._last_mJ = 0
        self._last_s = 0.0
        self._last_W = 0.0

    def _power_W(self) -> float:
        return self._nvml_read("power", self._nvml.nvmlDeviceGetPowerUsage) / 1000.0

    def _energy_mJ(self) -> int:
        return self._nvml_read("energy counter", self._nvml.nvmlDeviceGetTotalEnergyConsumption)

    def _nvml_read(self, what: str, fn: Callable[[Any], Any]) -> Any:
        return _nvml_call(self._nvml, f"read the {what} of GPU {self.uuid}", fn, self._handle)

    def start(self) -> None:
        self._total_J = self._unconfirmed_J = 0.0
        if not self.counts:
            return
        self._sync()
        self._last_s = self._clock()
        if self.has_counter:
            self._last_mJ = self._energy_mJ()
        else:
            self._last_W = self._power_W()

    def read(self) -> float:
        if not self.counts:
            return 0.0
        # Work queued on the GPU belongs to the window it was launched in.
        self._sync()
        now_s = self._clock()
        elapsed_s, self._last_s = now_s - self._last_s, now_s
        if not self.has_counter:
            power_W = self._power_W()
            self._total_J += 0.5 * (self._last_W + power_W) * elapsed_s
            self._last_W = power_W
            return self._total_J
        counter_mJ = self._energy_mJ()
        if counter_mJ > self._last_mJ:
            moved_J = (counter_mJ - self._last_mJ) / 1000.0
            repaid_J = min(moved_J, self._unconfirmed_J)
            self._unconfirmed_J -= repaid_J
            self._total_J += moved_J - repaid_J
        else:
            # Not moved (window shorter than the update period) or reset by the driver.
            credit_J = self._power_W() * elapsed_s
            self._unconfirmed_J += credit_J
            self._total_J += credit_J
        self._last_mJ = counter_mJ
        return self._total_J

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:  # nothing is lost: the readings are taken
            pass
