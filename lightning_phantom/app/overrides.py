"""Bad overrides as one line on stderr and exit code 2, before any process starts or folder is made.

Two kinds of bad configuration reach a command:

* what Hydra cannot compose: an option a config group does not have (``strategy=phantomm``), a
  key the configuration does not have (``stratgy=tp``), an override it cannot parse. Hydra prints
  these itself, over a dozen lines with exit code 1, unless ``HYDRA_FULL_ERROR`` is set, in which
  case it raises them. ``run_hydra_app`` sets it while Hydra composes, turns what it raises into
  one line (``composition_error``) and exit code 2, and ``composed()`` — called by the app's
  Hydra callback once a configuration is composed, before the run directory is made — clears it
  again, so the run and the processes it starts see Hydra's usual reports (a user's own
  ``HYDRA_FULL_ERROR`` is left alone).
* what composes but cannot run: ``ConfigError``, raised by the app's checks
  (``lightning_phantom.app.cli.check_config``); ``exit_on_config_error`` makes it one line and
  exit code 2.

Ctrl-C becomes one line and exit code 130 (``exit_on_interrupt``). ``run_hydra_app`` also keeps
lines that are not about the run off the terminal (``app.quiet``).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from lightning_phantom.app.quiet import silence_known_noise

FULL_ERROR = "HYDRA_FULL_ERROR"
_state = {"set_here": False, "composed": False}


class ConfigError(ValueError):
    """A configuration the app cannot run; the message says what to change."""


def exit_on_config_error(program: str, check: Callable, *args: Any) -> Any:
    """``check(*args)``; a ``ConfigError`` becomes one line on stderr and exit code 2."""
    try:
        return check(*args)
    except ConfigError as e:
        _fail(program, str(e))


def _fail(program: str, message: str) -> None:
    print(f"{program}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def exit_on_interrupt(program: str, fn: Callable[[], Any]) -> None:
    """``fn()``; Ctrl-C becomes one line on stderr and exit code 130 (128 + SIGINT), as in a shell.

    Whatever ``fn`` started is stopped before this: Lightning's launcher kills its ranks, and
    ``run_app_subprocess`` kills the run's whole session.
    """
    try:
        fn()
    except KeyboardInterrupt:
        print(f"\n{program}: interrupted (Ctrl-C); every process of the run was stopped", file=sys.stderr,
              flush=True)
        raise SystemExit(130) from None


def run_hydra_app(program: str, app: Callable[[], Any], conf_dir: Path, config_name: str) -> None:
    """Run the ``@hydra.main`` function ``app`` of ``program`` (its configs: ``conf_dir/config_name``)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    silence_known_noise()
    _state["set_here"] = FULL_ERROR not in os.environ
    _state["composed"] = False
    if _state["set_here"]:
        os.environ[FULL_ERROR] = "1"  # Hydra raises what it cannot compose instead of printing it
    try:
        exit_on_interrupt(program, app)
    except (HydraException, OmegaConfBaseException) as e:
        if _state["composed"]:  # raised by the run itself (the user's own HYDRA_FULL_ERROR): as it is
            raise
        _fail(program, composition_error(e, conf_dir, config_name))
    finally:
        composed()


def composed() -> None:
    """The configuration is composed: from now on Hydra reports errors as it usually does."""
    _state["composed"] = True
    if _state["set_here"]:
        os.environ.pop(FULL_ERROR, None)
        _state["set_here"] = False


def composition_error(e: Exception, conf_dir: Path, config_name: str) -> str:
    """What Hydra could not compose, in one line that says what to do."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(e)
    missing = getattr(e, "missing_cfg_file", None) or ""
    if isinstance(e, MissingConfigException) and e.options is not None and "/" in missing:
        group, _, option = missing.rpartition("/")
        return (f"{group}={option}: no such option of the config group {group!r}; choose one of "
                f"{', '.join(sorted(e.options))} (conf/{group}/*.yaml; add your own with --config-dir)")
    unknown = re.match(r"Could not override '([^']+)'\.\s*To append to your config use \+(\S+)", text)
    if unknown:
        return unknown_key(unknown.group(1), unknown.group(2), conf_dir, config_name)
    if isinstance(e, OverrideParseException):
        return f"cannot read the override {e.override!r}: {text.splitlines()[0]} (Hydra's override syntax)"
    return text


def unknown_key(key: str, override: str, conf_dir: Path, config_name: str) -> str:
    """An override of a key the configuration does not have: the key it may have meant, or, for an
    argument of a config group's object that its YAML leaves out (a Trainer argument, say), the
    ``+`` that adds it."""
    parent, _, last = key.rpartition(".")
    keys, target = _known(parent, conf_dir, config_name)
    arguments = _parameters(target) if target else []
    if last in arguments:
        return (f"{override}: {last!r} is an argument of {target} that conf/ does not set; add it with "
                f"+{override}")
    near = difflib.get_close_matches(last, [k for k in keys + arguments if k != last], n=1)
    hint = f"; did you mean {'.'.join(filter(None, [parent, near[0]]))!r}?" if near else ""
    listed = f" Its keys: {', '.join(keys)}." if keys and not target else ""
    return f"{override}: the configuration has no key {key!r}{hint}{listed}"


def _known(parent: str, conf_dir: Path, config_name: str) -> tuple[list[str], Optional[str]]:
    """Keys under ``parent`` in the default configuration, and the ``_target_`` there, if any."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name)
    except Exception:  # noqa: BLE001 - only a hint is lost
        return [], None
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return [], None
    return [str(k) for k in node if not str(k).startswith("_")], node.get("_target_")


def _parameters(target: str) -> list[str]:
    from hydra.utils import get_object

    try:
        parameters = inspect.signature(get_object(target)).parameters
    except Exception:  # noqa: BLE001 - only a hint is lost
        return []
    return [p for p in parameters if p not in ("self", "args", "kwargs")]
