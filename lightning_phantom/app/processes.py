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
from pathlib import Path
from typing import Callable, Optional, Sequence


def run_app_subprocess(overrides: Sequence[str], run_dir: Path, log_path: Path, timeout_s: float,
                       relay: Optional[Callable[[str], None]] = None) -> int:
    """``python -m lightning_phantom OVERRIDES hydra.run.dir=RUN_DIR``, its output in ``log_path``.

    Every line the run prints goes to ``log_path``, and also to ``relay`` as it comes (compare
    shows the progress lines). The child gets a session of its own, so that on a timeout or an
    interrupt the whole run, the Lightning launcher's children included, is killed rather
    than left behind.
    """
    command = [sys.executable, "-m", "lightning_phantom", *overrides, f'hydra.run.dir="{run_dir}"']
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def copy() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if relay is not None:
                    relay(line.rstrip("\n"))

        reader = threading.Thread(target=copy, daemon=True, name="run-output")
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise TimeoutError(f"{' '.join(command)} ran past {timeout_s:.0f} s and was killed; see "
                               f"{log_path}") from None
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
