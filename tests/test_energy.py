"""EnergyMonitor: the meters against fake hardware, the callback in real (tiny) fits."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_ranks

from lightning_phantom.energy import EnergyMonitor
from lightning_phantom.energy.meters import (
    EstimateMeter,
    NvmlMeter,
    RaplMeter,
    counted_once,
    load_nvml,
    nvml_device_handle,
    rapl_unavailable_reason,
)

# ---------------------------------------------------------------------------------------------
# fakes


class FakeGpu:
    def __init__(self, uuid: str, energy_mJ: int | None = 1_000_000, power_mW: int = 100_000) -> None:
        self.uuid, self.energy_mJ, self.power_mW = uuid, energy_mJ, power_mW
        self.energy_error: str | None = None  # e.g. "NoPermission": reading the counter raises it


def fake_nvml(gpus: list[FakeGpu], events: list[str] | None = None,
              init_error: str | None = None) -> types.ModuleType:
    """A module with the slice of the pynvml API the meters use, and pynvml's error classes."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    for name in ("NotSupported", "NoPermission", "NotFound", "LibraryNotFound", "GpuIsLost"):
        setattr(nvml, f"NVMLError_{name}", type(f"NVMLError_{name}", (nvml.NVMLError,), {}))
    nvml.inits = 0
    events = [] if events is None else events

    def init():
        if init_error:
            raise getattr(nvml, f"NVMLError_{init_error}")("as pynvml says it")
        nvml.inits += 1

    def energy(gpu):
        events.append("energy")
        if gpu.energy_error:
            raise getattr(nvml, f"NVMLError_{gpu.energy_error}")("as pynvml says it")
        if gpu.energy_mJ is None:
            raise nvml.NVMLError_NotSupported("no counter")
        return gpu.energy_mJ

    def by_uuid(uuid):
        found = [g for g in gpus if g.uuid == uuid]
        if not found:
            raise nvml.NVMLError_NotFound("Not Found")
        return found[0]

    def power(gpu):
        if gpu.power_mW is None:
            raise nvml.NVMLError_NotSupported("no power")
        return gpu.power_mW

    nvml.nvmlInit, nvml.nvmlShutdown = init, lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetUUID = lambda g: g.uuid.encode()  # old pynvml returns bytes
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    nvml.nvmlDeviceGetPowerUsage = power
    return nvml


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_zone(zone: Path, name: str, energy_uj: int, max_uj: int = 2**32) -> None:
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text(name + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


def fake_powercap(root: Path) -> dict[str, Path]:
    """Two packages with core + dram subzones, plus zones a meter must not add (psys, mmio)."""
    zones = {
        "pkg0": root / "intel-rapl:0",
        "core0": root / "intel-rapl:0" / "intel-rapl:0:0",
        "dram0": root / "intel-rapl:0" / "intel-rapl:0:1",
        "pkg1": root / "intel-rapl:1",
        "psys": root / "intel-rapl:2",
        "mmio": root / "intel-rapl-mmio:0",
        "dram0_link": root / "intel-rapl:0:1",  # sysfs lists subzones at the top level too
    }
    names = {"pkg0": "package-0", "core0": "core", "dram0": "dram", "pkg1": "package-1", "psys": "psys",
             "mmio": "package-0", "dram0_link": "dram"}
    for key, zone in zones.items():
        write_zone(zone, names[key], 10_000_000, max_uj=1_000_000_000)
    (root / "intel-rapl").mkdir()  # the control type directory, no counters
    return zones


def bump(zone: Path, delta_uj: int) -> None:
    path = zone / "energy_uj"
    path.write_text(f"{int(path.read_text()) + delta_uj}\n")


# ---------------------------------------------------------------------------------------------
# NVML


def test_nvml_counter_is_read_after_sync_and_differenced():
    events: list[str] = []
    gpu = FakeGpu("GPU-a", energy_mJ=5_000_000)
    meter = NvmlMeter(fake_nvml([gpu], events), gpu, sync=lambda: events.append("sync"))
    meter.start()
    events.clear()
    gpu.energy_mJ += 2_500
    assert meter.read() == pytest.approx(2.5)
    gpu.energy_mJ += 1_000
    assert meter.read() == pytest.approx(3.5)
    assert events == ["sync", "energy", "sync", "energy"]


def test_nvml_step_shorter_than_update_period_uses_power_and_is_repaid():
    clock = FakeClock()
    gpu = FakeGpu("GPU-a", energy_mJ=1_000, power_mW=150_000)
    meter = NvmlMeter(fake_nvml([gpu]), gpu, clock=clock)
    meter.start()
    clock.now = 0.01  # counter has not moved: 150 W x 10 ms, not a false 0 J
    assert meter.read() == pytest.approx(1.5)
    clock.now = 0.02
    assert meter.read() == pytest.approx(3.0)
    clock.now, gpu.energy_mJ = 0.10, gpu.energy_mJ + 10_000  # the counter now covers all 100 ms
    assert meter.read() == pytest.approx(10.0)
    clock.now, gpu.energy_mJ = 0.11, gpu.energy_mJ + 0
    assert meter.read() == pytest.approx(11.5)
    clock.now, gpu.energy_mJ = 0.20, gpu.energy_mJ + 1_000  # less than the 1.5 J credited: no new energy
    assert meter.read() == pytest.approx(11.5)
    clock.now, gpu.energy_mJ = 0.30, gpu.energy_mJ + 4_000  # 0.5 J still owed, 3.5 J new
    assert meter.read() == pytest.approx(15.0)


def test_nvml_gpu_without_counter_integrates_power():
    clock = FakeClock()
    gpu = FakeGpu("GPU-old", energy_mJ=None, power_mW=100_000)
    meter = NvmlMeter(fake_nvml([gpu]), gpu, clock=clock)
    assert not meter.has_counter
    meter.start()
    clock.now, gpu.power_mW = 2.0, 200_000
    assert meter.read() == pytest.approx(300.0)  # trapezoid: (100 + 200) / 2 W x 2 s
    clock.now = 3.0
    assert meter.read() == pytest.approx(500.0)


def test_nvml_gpu_without_counter_or_power_is_an_error():
    gpu = FakeGpu("GPU-mig", energy_mJ=None, power_mW=None)
    with pytest.raises(RuntimeError, match="GPU-mig.*neither total energy nor power"):
        NvmlMeter(fake_nvml([gpu]), gpu)


GPUS = ["GPU-aaaa1111", "GPU-bbbb2222", "GPU-cccc3333", "GPU-aaaa9999"]


@pytest.mark.parametrize(
    "visible, torch_index, expected",
    [
        (None, 2, "GPU-cccc3333"),
        ("2,0", 0, "GPU-cccc3333"),
        ("2,0", 1, "GPU-aaaa1111"),
        (" 3 , 1 ", 1, "GPU-bbbb2222"),
        ("GPU-bbbb2222,GPU-cccc3333", 1, "GPU-cccc3333"),
        ("GPU-cccc,GPU-aaaa9", 1, "GPU-aaaa9999"),  # unique prefixes, as CUDA accepts
    ],
)
def test_nvml_device_follows_cuda_visible_devices(visible, torch_index, expected):
    nvml = fake_nvml([FakeGpu(uuid) for uuid in GPUS])
    assert nvml_device_handle(nvml, torch_index, visible).uuid == expected


@pytest.mark.parametrize(
    "visible, torch_index, message",
    [
        ("0", 1, "makes 1 GPU"),
        ("GPU-aaaa", 0, "matches 2 GPUs"),
        ("GPU-dddd", 0, "matches no GPU"),
        ("first", 0, "neither a physical index"),
    ],
)
def test_nvml_device_selection_errors_say_what_was_given(visible, torch_index, message):
    nvml = fake_nvml([FakeGpu(uuid) for uuid in GPUS])
    with pytest.raises(ValueError, match=message):
        nvml_device_handle(nvml, torch_index, visible)


# CUDA numbers GPUs fastest first, NVML by PCI bus: on a node whose GPU at PCI slot 0 is the
# slow one, torch's cuda:0 is NVML's GPU 1.
NVML_ORDER = ["GPU-5105-slow", "GPU-f457-fast", "GPU-f458-fast"]
TORCH_ORDER = ["f457-fast", "f458-fast", "5105-slow"]  # torch's uuid has no "GPU-" prefix


@pytest.mark.parametrize("visible, torch_index, expected", [
    (None, 0, "GPU-f457-fast"),
    (None, 2, "GPU-5105-slow"),
    ("1,2", 0, "GPU-f458-fast"),  # torch's uuid of cuda:0 is then TORCH_ORDER[1]
])
def test_nvml_device_is_found_by_torch_s_uuid_whatever_the_order(visible, torch_index, expected):
    nvml = fake_nvml([FakeGpu(uuid) for uuid in NVML_ORDER])
    visible_order = TORCH_ORDER if visible is None else [TORCH_ORDER[int(i)] for i in visible.split(",")]
    handle = nvml_device_handle(nvml, torch_index, visible, torch_uuid=visible_order[torch_index])
    assert handle.uuid == expected
    with pytest.raises(ValueError, match=r"cuda:0 is the GPU with UUID 0000.*NVML knows no such GPU; it lists "
                                         r"\['GPU-5105-slow', 'GPU-f457-fast', 'GPU-f458-fast'\]"):
        nvml_device_handle(nvml, 0, None, torch_uuid="0000")


def test_monitor_reads_the_gpu_torch_trains_on_when_nvml_orders_them_otherwise(monkeypatch, tmp_path):
    gpus = [FakeGpu(uuid) for uuid in NVML_ORDER]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=TORCH_ORDER[i]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monitor = EnergyMonitor(meter="nvml", powercap_root=tmp_path)
    monitor.setup(_stub_trainer(torch.device("cuda", 0)), None, "fit")
    assert monitor._meter.uuid == "GPU-f457-fast"
    monitor._meter.start()
    gpus[0].energy_mJ += 9_000  # NVML's GPU 0: not the one torch trains on
    gpus[1].energy_mJ += 2_000
    assert monitor._meter.read() == pytest.approx(2.0)


@pytest.mark.parametrize("meter", ["nvml", "auto"])
def test_an_nvml_permission_error_is_a_clear_error_or_an_auto_fallback_saying_why(monkeypatch, tmp_path, meter):
    gpus = [FakeGpu(uuid) for uuid in NVML_ORDER]
    gpus[1].energy_error = "NoPermission"
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=TORCH_ORDER[i]))
    monitor = EnergyMonitor(meter=meter, powercap_root=tmp_path)
    why = (r"NVML could not read the energy counter of GPU GPU-f457-fast: NVMLError_NoPermission \(as pynvml says "
           r"it\): this user may not query the GPU; check that the NVIDIA driver is loaded")
    if meter == "nvml":
        with pytest.raises(RuntimeError, match=why):
            monitor.setup(_stub_trainer(torch.device("cuda", 0)), None, "fit")
        return
    with pytest.warns(UserWarning, match="uses meter='estimate': the Trainer runs on CUDA GPUs but NVML cannot "
                                         "measure them") as record:
        monitor.setup(_stub_trainer(torch.device("cuda", 0)), None, "fit")
    assert monitor.kind == "estimate" and len(record) == 1 and re.search(why, str(record[0].message))


def test_every_nvml_failure_says_what_failed_and_what_to_do():
    with pytest.raises(RuntimeError, match=r"NVML could not start \(nvmlInit\): NVMLError_LibraryNotFound .*"
                                           r"or use meter='auto', 'rapl' or 'estimate'"):
        load_nvml(fake_nvml([], init_error="LibraryNotFound"))
    gpu = FakeGpu("GPU-a")
    meter = NvmlMeter(fake_nvml([gpu]), gpu)
    meter.start()
    gpu.energy_error = "GpuIsLost"  # mid-run
    with pytest.raises(RuntimeError, match=r"NVML could not read the energy counter of GPU GPU-a: "
                                           r"NVMLError_GpuIsLost"):
        meter.read()


def test_a_shared_gpu_is_counted_by_its_lowest_rank_only():
    assert counted_once(["GPU-a", "GPU-b", "GPU-a", "GPU-b", "GPU-c"]) == [True, True, False, False, True]
    gpu = FakeGpu("GPU-a")
    meter = NvmlMeter(fake_nvml([gpu]), gpu)
    meter.counts = False
    meter.start()
    gpu.energy_mJ += 7_000
    assert meter.read() == 0.0


def test_pynvml_is_imported_lazily_and_initialised(monkeypatch):
    nvml = fake_nvml([FakeGpu("GPU-a")])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert load_nvml() is nvml and nvml.inits == 1


def _stub_trainer(device: torch.device) -> types.SimpleNamespace:
    strategy = types.SimpleNamespace(root_device=device, broadcast=lambda obj: obj)
    return types.SimpleNamespace(
        strategy=strategy, is_global_zero=True, world_size=1, global_rank=0, local_rank=0
    )


def test_auto_on_gpus_picks_nvml_on_the_rank_s_own_gpu(monkeypatch, tmp_path):
    gpus = [FakeGpu(uuid) for uuid in GPUS]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc,GPU-bbbb")
    monitor = EnergyMonitor(powercap_root=tmp_path)
    with pytest.warns(UserWarning, match="meter='nvml'") as record:
        monitor.setup(_stub_trainer(torch.device("cuda", 1)), None, "fit")
    assert len(record) == 1 and monitor.kind == "nvml"
    gpus[2].energy_mJ += 9_000  # not this rank's GPU
    gpus[1].energy_mJ += 4_000
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monitor._meter.start()
    gpus[1].energy_mJ += 3_000
    gpus[2].energy_mJ += 9_000
    assert monitor._meter.read() == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# RAPL and the choice of meter


def test_rapl_adds_packages_and_dram_once(tmp_path):
    zones = fake_powercap(tmp_path)
    meter = RaplMeter(tmp_path)
    meter.start()
    for key, delta in [("pkg0", 1_000_000), ("core0", 500_000), ("dram0", 250_000), ("pkg1", 2_000_000),
                       ("psys", 9_000_000), ("mmio", 1_000_000)]:
        bump(zones[key], delta)
    # The core is inside its package, psys contains the packages, mmio duplicates package 0.
    assert meter.read() == pytest.approx(1.0 + 0.25 + 2.0)


def test_rapl_counter_wrap_around(tmp_path):
    max_uj = 1_000_000_000
    write_zone(tmp_path / "intel-rapl:0", "package-0", max_uj - 100_000, max_uj)
    meter = RaplMeter(tmp_path)
    meter.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("400000\n")
    assert meter.read() == pytest.approx(0.5)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("1400000\n")
    assert meter.read() == pytest.approx(1.5)


def test_rapl_is_read_by_local_rank_zero_only(tmp_path):
    zones = fake_powercap(tmp_path)
    meter = RaplMeter(tmp_path / "missing", counts=False)  # never touches the files
    meter.start()
    bump(zones["pkg0"], 1_000_000)
    assert meter.read() == 0.0


def test_rapl_unreadable_is_a_clear_error(tmp_path):
    assert "no intel-rapl:N zones" in rapl_unavailable_reason(tmp_path)
    with pytest.raises(RuntimeError, match="meter='rapl' cannot read.*meter='estimate'"):
        RaplMeter(tmp_path)
    (tmp_path / "intel-rapl:0" / "energy_uj").mkdir(parents=True)
    assert "cannot be read" in rapl_unavailable_reason(tmp_path)


@pytest.mark.parametrize("with_rapl, kind", [(True, "rapl"), (False, "estimate")])
def test_auto_on_cpu_warns_once_with_the_meter_and_why(tmp_path, with_rapl, kind):
    if with_rapl:
        fake_powercap(tmp_path)
    monitor = EnergyMonitor(powercap_root=tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor.setup(_stub_trainer(torch.device("cpu")), None, "fit")
    messages = [str(w.message) for w in record if "EnergyMonitor" in str(w.message)]
    assert len(messages) == 1 and f"meter={kind!r}" in messages[0] and "runs on CPU" in messages[0]
    assert monitor.kind == kind
    if kind == "estimate":
        assert "not measured" in messages[0]


def test_estimate_is_cpu_time_times_watts():
    cpu = FakeClock()
    meter = EstimateMeter(12.5, cpu_time=cpu)
    cpu.now = 3.0
    meter.start()
    cpu.now = 5.0
    assert meter.read() == pytest.approx(25.0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"meter": "ipmi"}, ValueError, "one of .*'estimate'.*got 'ipmi'"),
        ({"watts_per_core": 0}, ValueError, "> 0, got 0"),
        ({"watts_per_core": "10"}, TypeError, "number of watts"),
        ({"target": "val_loss"}, TypeError, "must be a dict"),
        ({"target": {"monitor": "val_loss"}}, ValueError, "'monitor' and 'value'"),
        ({"target": {"monitor": "val_loss", "value": 1, "mode": "lowest"}}, ValueError, "'min' or 'max'"),
        ({"target": {"monitor": "val_loss", "value": "low"}}, TypeError, "a number"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, error, message):
    with pytest.raises(error, match=message):
        EnergyMonitor(**kwargs)


def test_nvml_on_a_cpu_trainer_is_an_error():
    with pytest.raises(ValueError, match="runs on cpu"):
        EnergyMonitor(meter="nvml").setup(_stub_trainer(torch.device("cpu")), None, "fit")


# ---------------------------------------------------------------------------------------------
# the callback in real fits


class TinyFFN:
    """Built lazily so that importing this file in the rank workers stays cheap."""

    @staticmethod
    def make(val_metric: bool = False):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
                )

            def training_step(self, batch, batch_idx):
                x, y = batch
                # 1 / (batches done); a train metric whose crossing point is known in advance
                self.log("score", 1.0 / (self.global_step + 1))
                return torch.nn.functional.mse_loss(self.net(x), y)

            def validation_step(self, batch, batch_idx):
                if val_metric:
                    self.log("val_steps", float(self.global_step))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Module()


def _loader(n: int = 64, batch_size: int = 4):
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 8, generator=generator), torch.randn(n, 1, generator=generator))
    return DataLoader(data, batch_size=batch_size)


def _trainer(log_dir, monitor, steps, log_every, devices=1, **kwargs):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        log_every_n_steps=log_every, callbacks=[monitor], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        logger=kwargs.pop("logger", CSVLogger(log_dir, name="run", version=0)), **kwargs,
    )


def _energy_rows(log_dir) -> list[dict]:
    with open(Path(log_dir) / "run" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("energy_estimate/step_J")]
    return [{key: float(value) for key, value in row.items() if value} for row in rows]


def _fit_on_rank(log_dir: str, log_every: int, steps: int) -> dict:
    import torch.distributed as dist

    reductions: list[int] = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == "lightning_phantom.energy.monitor":
            reductions.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    monitor = EnergyMonitor(meter="estimate", watts_per_core=5.0)
    trainer = _trainer(log_dir, monitor, steps, log_every, devices=2)
    dist.all_reduce = counting_all_reduce
    try:
        cpu_s = time.process_time()
        trainer.fit(TinyFFN.make(), _loader())
        cpu_s = time.process_time() - cpu_s
    finally:
        dist.all_reduce = all_reduce  # the worker outlives this test
    return {"local_J": monitor.local_J, "cpu_J": 5.0 * cpu_s, "summary": monitor.summary(),
            "reductions": reductions}


def test_estimate_on_two_ranks_sums_steps_and_ranks(tmp_path):
    steps = 6
    ranks = run_ranks(2, _fit_on_rank, str(tmp_path), 1, steps)
    rows = _energy_rows(tmp_path)
    assert len(rows) == steps
    assert all(name.startswith("energy_estimate/") for name in rows[0] if name.startswith("energy"))
    running = 0.0
    for row in rows:
        assert row["energy_estimate/step_J"] > 0
        running += row["energy_estimate/step_J"]
        assert row["energy_estimate/total_J"] == pytest.approx(running, rel=1e-5)
        # 2 ranks x 4 samples, over this one step's energy
        samples_per_J = 8 / row["energy_estimate/step_J"]
        assert row["energy_estimate/samples_per_J"] == pytest.approx(samples_per_J, rel=1e-5)
        assert row["energy_estimate/power_W"] > 0
    summary = ranks[0]["summary"]
    assert ranks[1]["summary"] == summary
    for rank in ranks:
        assert 0 < rank["local_J"] <= rank["cpu_J"]  # never more than the CPU time the test saw
        # One small all-reduce per step (log_every_n_steps=1) and one for the tail after the last step.
        assert len(rank["reductions"]) == steps + 1 and max(rank["reductions"]) <= 16
    # Ranks' own shares add up to the total; the logged total misses only the tail after the last step.
    assert summary["total_J"] == pytest.approx(ranks[0]["local_J"] + ranks[1]["local_J"], rel=1e-9)
    assert rows[-1]["energy_estimate/total_J"] <= summary["total_J"]
    assert summary["meter"] == "estimate" and summary["steps"] == steps and summary["samples"] == 8 * steps
    saved = json.loads((tmp_path / "run" / "version_0" / "energy_summary.json").read_text())
    assert saved == summary


def test_one_all_reduce_per_logging_interval(tmp_path):
    ranks = run_ranks(2, _fit_on_rank, str(tmp_path), 3, 7)
    rows = _energy_rows(tmp_path)
    assert [int(row["step"]) for row in rows] == [2, 5]
    # steps 1-3 and 4-6 in one reduction each; step 7 and the tail at the end of training
    sizes = ranks[0]["reductions"]
    assert len(sizes) == 3 and sizes[0] == sizes[1] == sizes[2] + 1  # 3 steps; 3 steps; 1 step + tail
    totals = [row["energy_estimate/total_J"] for row in rows]
    assert totals[0] < totals[1] < ranks[0]["summary"]["total_J"]


def test_energy_to_target_after_a_training_batch(tmp_path):
    monitor = EnergyMonitor(meter="estimate", target={"monitor": "score", "value": 0.21})
    trainer = _trainer(tmp_path, monitor, steps=8, log_every=1)
    trainer.fit(TinyFFN.make(), _loader())
    rows = _energy_rows(tmp_path)
    reached = monitor.energy_to_target
    # score = 1 / (global_step + 1) <= 0.21 first in the 5th batch (score 0.2), after which global_step is 5
    assert reached["step"] == 5 and reached["checked_after"] == "train"
    assert reached["reached_value"] == pytest.approx(0.2)
    assert reached["energy_J"] == pytest.approx(rows[4]["energy_estimate/total_J"], rel=1e-5)
    assert 0 < reached["time_s"] and reached["energy_J"] < monitor.summary()["total_J"]
    saved = json.loads((tmp_path / "run" / "version_0" / "energy_summary.json").read_text())
    assert saved["energy_to_target"] == reached
    assert set(saved) == {"meter", "total_J", "J_per_step_median", "power_W_avg", "steps", "samples",
                          "energy_to_target"}


def test_energy_to_target_after_validation(tmp_path):
    monitor = EnergyMonitor(meter="estimate", target={"monitor": "val_steps", "value": 6, "mode": "max"})
    trainer = _trainer(tmp_path, monitor, steps=8, log_every=1, val_check_interval=3, limit_val_batches=2)
    trainer.fit(TinyFFN.make(val_metric=True), _loader(), _loader(16))
    rows = {int(row["step"]): row["energy_estimate/total_J"] for row in _energy_rows(tmp_path)}
    reached = monitor.energy_to_target
    assert reached["step"] == 6 and reached["checked_after"] == "validation"
    # Validation after step 6 is charged to step 7: the target's energy lies strictly between.
    assert rows[5] < reached["energy_J"] < rows[6]


def test_summary_goes_to_default_root_dir_without_logger(tmp_path):
    monitor = EnergyMonitor(meter="estimate", target={"monitor": "never_logged", "value": 1.0})
    trainer = _trainer(tmp_path, monitor, steps=2, log_every=1, logger=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="'never_logged' never appeared.*log it with self.log\\('never_logged'"):
        trainer.fit(TinyFFN.make(), _loader())
    saved = json.loads((tmp_path / "energy_summary.json").read_text())
    assert saved["steps"] == 2 and saved["energy_to_target"] is None and saved["total_J"] > 0
    assert math.isclose(saved["total_J"], monitor.local_J)


def test_target_warning_names_a_run_too_short_to_validate(tmp_path):
    """A metric logged in validation_step is missing because no validation ran: the warning says so."""
    monitor = EnergyMonitor(meter="estimate", target={"monitor": "val_steps", "value": 1.0})
    trainer = _trainer(tmp_path, monitor, steps=3, log_every=1, val_check_interval=50,
                       check_val_every_n_epoch=None)
    with pytest.warns(UserWarning, match=r"no validation ran in these 3 training steps \(val_check_interval=50\)"):
        trainer.fit(TinyFFN.make(val_metric=True), _loader(), _loader(16))


def test_totals_and_target_survive_a_resume_from_checkpoint(tmp_path):
    target = {"monitor": "score", "value": 0.34}  # score 1/3 in the 3rd batch
    first = EnergyMonitor(meter="estimate", target=target)
    trainer = _trainer(tmp_path / "a", first, steps=4, log_every=1)
    trainer.fit(TinyFFN.make(), _loader())
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    before = first.summary()
    assert before["energy_to_target"]["step"] == 3

    resumed = EnergyMonitor(meter="estimate", target=target)
    _trainer(tmp_path / "b", resumed, steps=6, log_every=1).fit(
        TinyFFN.make(), _loader(), ckpt_path=tmp_path / "four.ckpt"
    )
    after = resumed.summary()
    assert after["steps"] == 6 and after["samples"] == 24
    assert after["total_J"] > before["total_J"] and after["energy_to_target"] == before["energy_to_target"]
    rows = _energy_rows(tmp_path / "b")
    expected = before["total_J"] + rows[0]["energy_estimate/step_J"]
    assert rows[0]["energy_estimate/total_J"] == pytest.approx(expected, rel=1e-5)
