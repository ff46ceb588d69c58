"""What a configuration builds: the run's objects, and the keys the app reads.

The checks before a run (``lightning_phantom.app.cli.check_config``) build the very objects the
run builds — data module, model (on the meta device: no memory, no arithmetic), strategy, energy
monitor and Trainer — and throw them away, so each object's own validator refuses a bad value
(``trainer.precision=bf17-mixed``, ``strategy.data_parallel=fsdpp``, ``+trainer.foo=1``) with its
own words, before any process starts; the app repeats none of their rules. What goes wrong in a
constructor becomes a ``ConfigError`` naming the config key.

Keys no object reads are refused too (``check_keys``): a key that is not in the app's primary
config (``conf/config.yaml``, its groups, and ``compare`` for the comparison), or under a section
of it that builds nothing (``measure``). ``+stratgy=tp`` would otherwise run phantom with the typo
ignored.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_phantom.app.overrides import ConfigError

# Errors a constructor raises for a value it refuses (Lightning's MisconfigurationException is an Exception).
_REFUSALS = ("ValueError", "TypeError", "KeyError", "ImportError", "ModuleNotFoundError",
             "MisconfigurationException", "ConfigError")


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[key], **kwargs)``; a constructor's refusal is a ConfigError naming
    ``key``."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(cfg[key], **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if not any(t.__name__ in _REFUSALS for t in type(cause).__mro__):
            raise
        target = cfg[key].get("_target_", "?")
        raise ConfigError(f"{key} ({target}): {cause}") from None


@dataclass
class RunObjects:
    """The objects of one run, built from its configuration."""

    data: Any
    model: Any
    strategy: Any
    monitor: Optional[Any]  # EnergyMonitor, None with energy=off


def build_run(cfg: DictConfig, meta: bool = False) -> RunObjects:
    """Data module, model, strategy and energy monitor of ``cfg``; the model on the meta device if
    ``meta``."""
    import torch

    data = build(cfg, "data")
    with torch.device("meta") if meta else _nothing():
        model = build(cfg, "model")
    strategy = build(cfg, "strategy")
    energy = cfg.get("energy")
    monitor = build(cfg, "energy") if energy and "_target_" in energy else None
    return RunObjects(data, model, strategy, monitor)


def check_trainer(cfg: DictConfig, strategy: Any) -> None:
    """Build the run's Trainer (no logger, no callbacks) and throw it away: its own checks, quietly."""
    with _quietly():
        build(cfg, "trainer", strategy=strategy, logger=False)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _quietly() -> Iterator[None]:
    """Lightning's notes and warnings of a Trainer built only to be checked: the run's own prints them."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def check_keys(cfg: DictConfig, conf_dir: Path, config_name: str = "config") -> None:
    """Every key of ``cfg`` is one the app reads: in its primary config ``config_name`` or under a
    config group (whose objects check their own arguments when built), else a ConfigError."""
    _check_under(cfg, _reference(conf_dir, config_name), "")


def _check_under(node: DictConfig, reference: dict[str, Any], path: str) -> None:
    for key in node:
        key = str(key)
        if key == "hydra" and not path:
            continue
        if key not in reference:
            near = difflib.get_close_matches(key, list(reference), n=1)
            hint = f"; did you mean {'.'.join(filter(None, [path, near[0]]))!r}?" if near else "."
            where = ".".join(filter(None, [path, key]))
            raise ConfigError(f"unknown key {where!r}: nothing reads it{hint} The keys "
                              f"{'of ' + path if path else 'at the top'} are: {', '.join(reference)}.")
        inner = reference[key]
        if isinstance(inner, dict) and OmegaConf.is_dict(node[key]):  # a section that builds nothing
            _check_under(node[key], inner, f"{path}.{key}" if path else key)


def _reference(conf_dir: Path, name: str = "config") -> dict[str, Any]:
    """The keys of primary config ``name`` (and the configs it includes): a nested dict for a plain
    section, ``None`` for a value or a config group (checked by building its object)."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{name}.yaml"))
    assert isinstance(raw, dict)
    out: dict[str, Any] = {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, dict):
            out.update({str(group).split("@")[0].split("/")[0].lstrip("+"): None for group in entry})
        elif entry != "_self_":
            out.update(_reference(conf_dir, str(entry)))
    out.update({k: _shape(v) for k, v in raw.items() if k != "hydra"})
    return out


def _shape(value: Any) -> Any:
    if isinstance(value, dict) and "_target_" not in value:
        return {k: _shape(v) for k, v in value.items()}
    return None
