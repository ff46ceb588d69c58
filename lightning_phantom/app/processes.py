"""The app as a child process: ``run_app_subprocess`` runs one configuration and kills it whole.

``compare`` runs every strategy this way, and a multirun job on several devices too (Lightning's
launcher would otherwise re-run the whole sweep in its children).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


def run_app_subprocess(overrides: Sequence[str], run_dir: Path, log_path: Path, timeout_s: float,
                       relay: Optional[Callable[[str], None]] = None) -> int:
    """``python -m lightning_phantom OVERRIDES hydra.run.dir=RUN_DIR``, its output in ``log_path``.

    The child gets a session of its own, so that on a timeout or an interrupt the whole run,
    the Lightning launcher's children included, is killed rather than left behind.
    ``timeout_s`` bounds its silence, not its length (``run_logged``).
    """
    command = [sys.executable, "-m", "lightning_phantom", *overrides, f'hydra.run.dir="{run_dir}"']
    return run_logged(command, log_path, timeout_s, relay)


def run_logged(command: Sequence[str], log_path: Path, silence_s: float,
               relay: Optional[Callable[[str], None]] = None) -> int:
    """Run ``command`` in a session of its own; every line it prints goes to ``log_path``, and to
    ``relay`` as it comes (compare shows the progress lines).

    It is killed, with every process it started, once it has printed nothing for ``silence_s``:
    a hung run goes quiet, while a run that is only slow (a busy machine: 2 cores shared with
    other jobs made a 2-minute run take 10) keeps printing its progress and is let finish.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        last_output = [time.monotonic()]

        def copy() -> None:
            for line in proc.stdout:
                last_output[0] = time.monotonic()
                log.write(line)
                log.flush()
                if relay is not None:
                    relay(line.rstrip("\n"))

        reader = threading.Thread(target=copy, daemon=True, name="run-output")
        reader.start()
        rc = None
        try:
            while rc is None:
                quiet_for = time.monotonic() - last_output[0]
                if quiet_for >= silence_s:  # killed below, as on any error
                    raise TimeoutError(f"{' '.join(command)} printed nothing for {quiet_for:.0f} s and was "
                                       f"killed (hung?); see {log_path}. compare.timeout_s sets how long a "
                                       "run may stay silent.")
                try:
                    rc = proc.wait(timeout=min(5.0, silence_s - quiet_for))
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            _kill(proc)
            raise
        reader.join(timeout=10)
        return rc


def _kill(proc: subprocess.Popen) -> None:
    """The run and every process it started (its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
