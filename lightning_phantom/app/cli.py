"""The command-line app: one training run from ``conf/`` (``python -m lightning_phantom``).

    python -m lightning_phantom strategy=tp model.width=4096 trainer.devices=2
    lightning-phantom strategy=phantom strategy.ghosts=16 data=digits energy=estimate

The configuration is checked (``check_config``: the app's own rules, then every object built
once and thrown away, ``app.objects``) before Hydra makes the run directory, so a bad one fails
with one line and exit code 2 before any process is started (``app.overrides``). Then every
object is built (``app.objects.build``) and ``Trainer.fit`` runs; with ``trainer.devices > 1``
Lightning's subprocess launcher re-runs this app in each further process, and its Hydra handling gives
them the parent's run directory. Rank 0 writes ``result.json`` there (what
``lightning_phantom.app.recorder.RunRecorder`` measured), which ``python -m lightning_phantom.compare``
reads.

Under a Hydra multirun (``-m``) a job on several devices runs as a plain run in a subprocess:
Lightning's launcher would otherwise re-run the whole sweep in its children.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from lightning_phantom._checks import positive_int
from lightning_phantom.app.objects import build, build_run, check_keys, check_trainer
from lightning_phantom.app.overrides import ConfigError, composed, exit_on_config_error, run_hydra_app
from lightning_phantom.app.processes import run_app_subprocess


def _conf_dir() -> Path:
    """The configs: ``lightning_phantom/conf`` in an installed package (setup.py ships the
    top-level ``conf/`` there), else the ``conf/`` of the source checkout this package runs from."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "conf"
    return installed if (installed / "config.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()
RESULT_FILE = "result.json"
STRATEGIES = {  # _target_ (class or factory) → the name the app and the tables use
    "lightning_phantom.strategy.PhantomStrategy": "phantom",
    "lightning_phantom.PhantomStrategy": "phantom",
    "lightning.pytorch.strategies.ModelParallelStrategy": "tp",
    "lightning.pytorch.strategies.model_parallel.ModelParallelStrategy": "tp",
    "lightning.pytorch.strategies.DDPStrategy": "ddp",
    "lightning.pytorch.strategies.ddp.DDPStrategy": "ddp",
    "lightning_phantom.app.cli.single_device_strategy": "single",
}


@dataclass(frozen=True)
class Plan:
    """What a checked configuration will run: the strategy and the layout of its ranks."""

    strategy: str  # phantom | tp | ddp | single
    world_size: int
    group_size: int  # ranks sharing one copy of the model (phantom or tensor-parallel group)
    data_parallel: int  # copies of the model
    sizes: list[int]  # the FFN, [d_in, n, ..., n, d_out]; the GPT, [vocab, d (one per block), vocab]
    ghosts: Optional[list[int]]  # per phantom layer (phantom only)


def single_device_strategy(accelerator: str = "cpu"):
    """``SingleDeviceStrategy`` on the first device of ``accelerator`` (``strategy=single``)."""
    import torch
    from lightning.pytorch.strategies import SingleDeviceStrategy

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return SingleDeviceStrategy(device=torch.device("cuda", 0))
    if accelerator not in ("cpu", "auto"):
        raise ConfigError(f"strategy=single supports trainer.accelerator cpu, gpu or auto, got "
                          f"{accelerator!r}")
    return SingleDeviceStrategy(device=torch.device("cpu"))


# ---------------------------------------------------------------- checking
def strategy_kind(strategy_cfg: Any) -> str:
    """phantom | tp | ddp | single, from the strategy config's ``_target_``."""
    target = strategy_cfg.get("_target_") if isinstance(strategy_cfg, (dict, DictConfig)) else None
    if target not in STRATEGIES:
        raise ConfigError(f"strategy._target_={target!r} is not a strategy this app knows; choose "
                          "strategy=phantom, tp, ddp or single (conf/strategy/*.yaml)")
    return STRATEGIES[target]


def _int(name: str, value: Any, low: int = 1) -> int:
    return positive_int(name, value, low, error=ConfigError)


def _devices(trainer_cfg: Any) -> int:
    """Processes per node that ``Trainer(accelerator=..., devices=...)`` will start."""
    import torch

    devices, accelerator = trainer_cfg.get("devices", "auto"), trainer_cfg.get("accelerator", "auto")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but torch {torch.__version__} sees no CUDA "
                          "GPU; use trainer=cpu")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:  # "0,1": those GPUs
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if devices in ("auto", -1):  # Lightning: every GPU; on CPU "auto" is 1 process, -1 one per core
        return torch.cuda.device_count() if gpu else 1 if devices == "auto" else os.cpu_count() or 1
    return _int("trainer.devices", devices)


def _phantom_layout(s: DictConfig, world: int, nodes: int):
    from lightning_phantom.strategy.layout import PhantomLayout

    try:
        return PhantomLayout.resolve(s.get("data_parallel_size", "auto"), s.get("phantom_parallel_size", "auto"),
                                     world, nodes)
    except ValueError as e:
        raise ConfigError(f"strategy=phantom on trainer.devices × trainer.num_nodes = {world} ranks: "
                          f"{e}") from None


def _phantom_ghosts(s: DictConfig, strategy: Any, model: Any, p: int, ghosts_fit: str, plan_fit: str) -> list[int]:
    """The strategy's plan (``strategy.ghosts``, ``strategy.plan``) of the model, found as the strategy finds
    it; the ghosts of every phantom layer in order, or a ConfigError saying what does not fit what."""
    from lightning_phantom.nn.plan import plan_module

    given = OmegaConf.to_container(s)
    try:
        found = plan_module(model, strategy.plan, p)
    except ValueError as e:
        what = (f"strategy.plan={given['plan']!r} does not fit {plan_fit}" if given.get("plan") else
                f"strategy.ghosts={given.get('ghosts', 'auto')!r} does not fit {ghosts_fit}")
        raise ConfigError(f"{what} on phantom groups of {p}: {e}") from None
    return [k for ffn, _ in found.convert for k in ffn.ghosts] + [k for stack, _ in found.stacks for k in stack.ghosts]


def _check_phantom(s: DictConfig, strategy: Any, model: Any, world: int, nodes: int, width: int, depth: int):
    """The strategy's own checks, run here before any process starts: the layout, and its plan of the FFN."""
    layout = _phantom_layout(s, world, nodes)
    p = layout.phantom
    if depth < 1:
        raise ConfigError("strategy=phantom needs at least one hidden width -> width layer to make phantom; "
                          f"got model.depth={depth}. Use model.depth >= 1")
    if width % p:
        raise ConfigError(f"model.width={width} is not divisible by the phantom group size {p} "
                          f"({width} % {p} = {width % p}); every rank holds width/p neurons. Use a multiple "
                          f"of {p}")
    ghosts = _phantom_ghosts(s, strategy, model, p, f"model.width={width}",
                             f"the app's model (its FFN is 'net', model.width={width})")
    return p, layout.data, ghosts


def _check_tp(s: DictConfig, world: int, nodes: int, sizes: list[int]) -> tuple[int, int]:
    from lightning_phantom.cost.model import tp_cost

    group, data = _tp_layout(s, world, nodes)
    try:
        tp_cost(sizes, group, rows=1)
    except ValueError as e:
        raise ConfigError(f"strategy=tp cannot shard the model's sizes {sizes} over {group} ranks: "
                          f"{e}") from None
    return group, data


def _tp_layout(s: DictConfig, world: int, nodes: int) -> tuple[int, int]:
    """ModelParallelStrategy's tensor-parallel group size and replicas."""
    data = s.get("data_parallel_size", "auto")
    data = nodes if data == "auto" else _int("strategy.data_parallel_size", data)
    group = s.get("tensor_parallel_size", "auto")
    group = world // nodes if group == "auto" else _int("strategy.tensor_parallel_size", group)
    if data * group != world:
        raise ConfigError(f"strategy=tp: data_parallel_size({data}) * tensor_parallel_size({group}) != "
                          f"trainer.devices × trainer.num_nodes ({world})")
    return group, data


GPT_MODULE = "lightning_phantom.app.language_model.GPTModule"
TEXT_DATA = "lightning_phantom.app.text.TextDataModule"


def _check_gpt(cfg: DictConfig, kind: str, world: int, nodes: int) -> tuple[list[int], int, int]:
    """model=gpt: its data, its settings and what the strategy asks of them; returns the plan's
    sizes ([vocab, width per block, vocab]), the model-parallel group size and the replicas."""
    from lightning_phantom.app.gpt import gpt_settings_error
    from lightning_phantom.app.tensor_parallel import GPT_HEADS

    if cfg.data.get("_target_") != TEXT_DATA:
        raise ConfigError(f"model=gpt learns next-byte prediction on data=text, got data._target_="
                          f"{cfg.data.get('_target_')!r}; add data=text")
    m = cfg.model
    settings = {key: m.get(key) for key in ("vocab", "width", "layers", "heads", "mlp_ratio", "context", "dropout")}
    error = gpt_settings_error(**settings)
    if error:
        raise ConfigError(error)
    if settings["vocab"] != cfg.data.get("vocab") or settings["context"] < cfg.data.get("context"):
        raise ConfigError(f"model.vocab={settings['vocab']} and model.context={settings['context']} must hold the "
                          f"data's tokens (data.vocab={cfg.data.get('vocab')}) and windows (data.context="
                          f"{cfg.data.get('context')}); leave them as ${{data.vocab}} and ${{data.context}}")
    if m.get("tp_head") not in GPT_HEADS:
        raise ConfigError(f"model.tp_head must be one of {', '.join(GPT_HEADS)}, got {m.get('tp_head')!r}")
    group, data = (1, world)
    if kind == "tp":
        group, data = _tp_layout(cfg.strategy, world, nodes)
    elif kind == "phantom":
        layout = _phantom_layout(cfg.strategy, world, nodes)
        group, data = layout.phantom, layout.data
    sharded = [("model.heads", settings["heads"])]  # then width and MLP width are divisible too
    if kind == "tp" and m.tp_head == "vocab_parallel":
        sharded.append(("model.vocab", settings["vocab"]))
    for name, n in sharded if kind in ("tp", "phantom") else ():
        if n % group:
            raise ConfigError(f"strategy={kind} splits {name} = {n} over its {group} ranks, but {n} % {group} = "
                              f"{n % group}; use a multiple of {group}")
    return [settings["vocab"]] + [settings["width"]] * settings["layers"] + [settings["vocab"]], group, data


def _check_energy(cfg: DictConfig) -> None:
    energy = cfg.get("energy") or {}
    if "_target_" not in energy:
        return
    meter = energy.get("meter")
    if meter == "nvml" and cfg.trainer.get("accelerator") == "cpu":
        raise ConfigError("energy=nvml measures NVIDIA GPUs, but trainer=cpu; use energy=auto, rapl or "
                          "estimate, or trainer=gpu")
    if meter == "rapl":
        from lightning_phantom.energy.meters import rapl_unavailable_reason

        why = rapl_unavailable_reason(energy.get("powercap_root", "/sys/class/powercap"))
        if why is not None:
            raise ConfigError(f"energy=rapl cannot read the RAPL counters: {why}; use energy=auto or "
                              "estimate")


def check_config(cfg: DictConfig) -> Plan:
    """Everything that can be known before a process starts; raises ``ConfigError`` with the fix.

    The app's own rules first (they name the keys to change), then each object built as the run
    builds it (``app.objects``: their own validators), the Trainer last.
    """
    kind = strategy_kind(cfg.get("strategy"))
    check_keys(cfg, CONF_DIR)
    nodes = _int("trainer.num_nodes", cfg.trainer.get("num_nodes", 1))
    world = _devices(cfg.trainer) * nodes
    m = cfg.model
    if kind == "single" and world != 1:
        raise ConfigError(f"strategy=single runs on one device, but trainer.devices × trainer.num_nodes = "
                          f"{world}; set trainer.devices=1, or choose strategy=phantom, tp or ddp")
    group, data, ghosts = 1, world, None
    if m.get("_target_") == GPT_MODULE:  # the language model: checks of its own
        sizes, group, data = _check_gpt(cfg, kind, world, nodes)
        built = build_run(cfg, meta=True)
        if kind == "phantom":
            w, f = m.width, m.mlp_ratio * m.width
            ghosts = _phantom_ghosts(cfg.strategy, built.strategy, built.model, group,
                                     f"model=gpt (4 phantom layers per block, reading {w}, {w}, {w} and {f} features)",
                                     "the app's GPT (its blocks are 'gpt.blocks')")
    elif cfg.data.get("_target_") == TEXT_DATA:
        raise ConfigError("data=text is a byte corpus for the language model; add model=gpt")
    else:
        width, depth = _int("model.width", m.width), _int("model.depth", m.depth, 0)
        d_in, d_out = _int("model.input_size", m.input_size), _int("model.output_size", m.output_size)
        sizes = [d_in] + [width] * (depth + 1) + [d_out]
        built = build_run(cfg, meta=True)
        if kind == "phantom":
            group, data, ghosts = _check_phantom(cfg.strategy, built.strategy, built.model, world, nodes, width,
                                                 depth)
        elif kind == "tp":
            group, data = _check_tp(cfg.strategy, world, nodes, sizes)
    _check_energy(cfg)
    every = cfg.get("progress_every", "auto")
    if every != "auto":
        _int("progress_every", every)
    stop = cfg.get("stop_at_target", False)
    if not isinstance(stop, bool):
        raise ConfigError(f"stop_at_target must be true or false, got {stop!r}")
    target = cfg.get("target_loss")
    if stop and (isinstance(target, bool) or not isinstance(target, (int, float))):
        raise ConfigError(f"stop_at_target=true needs a number as target_loss, got {target!r}")
    check_trainer(cfg, built.strategy)
    return Plan(kind, world, group, data, sizes, ghosts)


# ---------------------------------------------------------------- running
def run(cfg: DictConfig, run_dir: Optional[os.PathLike] = None) -> Optional[dict]:
    """Train once from ``cfg``; on global rank 0 write ``result.json`` into ``run_dir`` and return it."""
    plan = check_config(cfg)
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    import lightning_phantom.strategy  # noqa: F401  registers strategy="phantom"
    from lightning_phantom.app.callbacks import ProgressLog, ValidateAtEnd
    from lightning_phantom.app.recorder import RunRecorder

    run_dir = Path(run_dir or os.getcwd())
    # An equal share of the cores per rank, as Lightning gives DDP's ranks. ModelParallelStrategy (and
    # PhantomStrategy) start their other ranks without it, and each then runs as many threads as there
    # are cores: on 2 cores TP on 4 ranks ran 5x slower. Set before the launcher starts them (they
    # inherit OMP_NUM_THREADS), so every strategy runs alike; a launcher's own setting (torchrun) wins.
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

    _set_num_threads_if_needed(num_processes=max(1, plan.world_size // int(cfg.trainer.get("num_nodes", 1))))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the same dense init on every rank
    built = build_run(cfg)
    monitor = built.monitor
    measure = cfg.get("measure") or {}
    recorder = RunRecorder(plan, count_step=measure.get("count_step"), energy=monitor,
                           warmup_steps=measure.get("warmup_steps", 3),
                           rss_period_s=measure.get("rss_period_s", 0.01))
    every = cfg.get("progress_every", "auto")
    progress = None if cfg.get("quiet", False) else ProgressLog(None if every == "auto" else every,
                                                               prefix=f"{plan.strategy}: ")
    # The recorder after the monitor: it reads the joules of the step the monitor has just closed.
    callbacks = [c for c in (ValidateAtEnd(), monitor, recorder, progress) if c is not None]
    if cfg.get("stop_at_target", False):
        from lightning.pytorch.callbacks import EarlyStopping

        # Stops at the threshold only: no patience-based stop (its patience is never used up).
        callbacks.append(EarlyStopping("val_loss", mode="min", stopping_threshold=float(cfg.target_loss),
                                       patience=sys.maxsize, check_on_train_epoch_end=False))
    logger = CSVLogger(run_dir, name="logs", version="") if cfg.get("csv_logger", True) else False
    trainer = build(cfg, "trainer", strategy=built.strategy, callbacks=callbacks, logger=logger,
                    default_root_dir=str(run_dir))
    try:
        trainer.fit(built.model, datamodule=built.data)
    except SystemExit:
        if trainer.interrupted:  # Lightning stopped every process on Ctrl-C and exits with 1
            raise KeyboardInterrupt from None
        raise
    if not trainer.is_global_zero:
        return None
    result = {**recorder.result, "config": OmegaConf.to_container(cfg, resolve=True), "plan": asdict(plan)}
    if hasattr(built.data, "describe"):  # what the run trained on (data=text: files, bytes, SHA-256)
        result["data"] = built.data.describe()
    path = run_dir / RESULT_FILE
    path.write_text(json.dumps(result, indent=1))
    print(summary_line(result) + f"\n(result written to {path})", flush=True)
    return result


def summary_line(result: dict) -> str:
    energy = result.get("energy") or {}
    joules = f", {energy['total_J']:.4g} J ({energy['meter']})" if energy.get("total_J") is not None else ""
    val = result["final_val_loss"]
    bpc = f" ({result['final_val_bpc']:.4g} bits/char)" if result.get("final_val_bpc") is not None else ""
    return (f"{result['strategy']}: {result['steps']} steps, median step "
            f"{1e3 * result['step_time_s']:.3g} ms, final train loss {result['final_train_loss']:.4g}, "
            f"val loss {'-' if val is None else format(val, '.4g')}{bpc}{joules}")


def _launched_externally() -> bool:
    """This process is one rank of a job someone else started (Lightning, torchrun, SLURM)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return "LOCAL_RANK" in os.environ or TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def _run_multirun_job() -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    log = run_dir / "run.log"
    rc = run_app_subprocess(list(hc.overrides.task), run_dir, log, timeout_s=7 * 24 * 3600, relay=print)
    if rc:
        raise SystemExit(rc)  # its output, the error included, was relayed above


class CheckConfig(HydraCallback):
    """Checks the configuration before Hydra makes the run directory (``hydra.callbacks`` in
    conf/config.yaml): a rejected configuration leaves no folder behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        composed()
        exit_on_config_error("lightning-phantom", check_config, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        composed()  # each job is checked as it starts (_app)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    plan = exit_on_config_error("lightning-phantom", check_config, cfg)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and plan.world_size > 1 and not _launched_externally():
        _run_multirun_job()
    else:
        exit_on_config_error("lightning-phantom", run, cfg, hc.runtime.output_dir)


def main() -> None:
    """``lightning-phantom`` / ``python -m lightning_phantom``."""
    run_hydra_app("lightning-phantom", _app, CONF_DIR, "config")


if __name__ == "__main__":
    main()
