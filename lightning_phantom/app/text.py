"""Real text with no download (``data=text``): the source of Python's standard library, as bytes.

Every machine that runs this package has the corpus: the ``.py`` files of the standard library
(``sysconfig.get_paths()["stdlib"]``). A pinned selection of 30 modules, present in Python 3.10
to 3.13 and ASCII in 3.11, is split by file: 24 files (1.44 MB) for training, 6 (124 kB) for
validation. Tokens are bytes (vocabulary 256); the selection being ASCII, a byte is a character,
so the validation loss is in nats per character and ``val_bpc`` (= val_loss / ln 2) in bits per
character.

What a run read is recorded (``TextDataModule.describe``, in ``result.json`` under ``data``):
the files, their size in bytes and a SHA-256 over every file's name and contents. Another Python
release ships other versions of these files: the hash then differs from ``PINNED_SHA256`` (taken
on CPython 3.11.7), a warning says so, and losses are not comparable with figures taken on the
pinned corpus. A pinned file that is missing is left out with the same warning; a split with no
file left is an error.

* Training: ``train_windows`` windows of ``context + 1`` bytes (inputs and next-byte targets) at
  random offsets of the training text, drawn once from ``seed``: every rank draws the same, and
  the strategy's sampler splits them over data-parallel replicas only, so the ranks of a
  tensor-parallel (or phantom) group see the same batch.
* Validation: ``val_windows`` fixed windows, evenly spaced over the validation text (every
  validation file contributes), the same in every run.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as pl

TRAIN_FILES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "dataclasses.py", "difflib.py", "enum.py",
    "inspect.py", "ipaddress.py", "logging/__init__.py", "optparse.py", "pickle.py", "pprint.py", "random.py",
    "shutil.py", "socket.py", "subprocess.py", "tempfile.py", "threading.py", "tokenize.py", "traceback.py",
    "typing.py", "collections/__init__.py", "json/decoder.py",
)
VAL_FILES = ("contextlib.py", "csv.py", "gettext.py", "queue.py", "textwrap.py", "uuid.py")
PINNED_PYTHON = "3.11.7"
PINNED_SHA256 = "f2aff4eab502bcfa964b69aafec4e9d60f3b7cb75319ba8c72bf8d7764c054fe"
VOCAB = 256  # bytes


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
    return value


class Windows(Dataset):
    """Windows of ``context + 1`` bytes of ``text`` at ``starts``: (inputs, next-byte targets)."""

    def __init__(self, text: torch.Tensor, context: int, starts: torch.Tensor) -> None:
        self.text, self.context, self.starts = text, context, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[i])
        window = self.text[start:start + self.context + 1].long()
        return window[:-1], window[1:]


def train_windows(text: torch.Tensor, context: int, count: int, seed: int) -> Windows:
    """``count`` windows at random offsets drawn from ``seed``: the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return Windows(text, context, torch.randint(0, len(text) - context, (count,), generator=generator))


def val_windows(text: torch.Tensor, context: int, count: int) -> Windows:
    """``count`` windows evenly spaced over ``text``, first and last included (as many as fit, if fewer)."""
    last = len(text) - context - 1
    return Windows(text, context, torch.linspace(0, last, min(count, last + 1)).round().long().unique())


def read_corpus(root: Path, files: tuple[str, ...]) -> tuple[bytes, list[str], list[str]]:
    """The files' bytes joined by a blank line, the files read and the files missing."""
    found, missing, parts = [], [], []
    for name in files:
        path = root / name
        if path.is_file():
            found.append(name)
            parts.append(path.read_bytes())
        else:
            missing.append(name)
    return b"\n\n".join(parts), found, missing


def corpus_hash(root: Path, files: list[str]) -> str:
    """SHA-256 over every file's name and contents, in order."""
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return h.hexdigest()


class TextDataModule(pl.LightningDataModule):
    """Next-byte prediction on the standard library's source (see the module docstring).

    Args:
        context: tokens per window (the GPT's context).
        batch_size: windows per training step on each data-parallel replica.
        train_windows: random training windows (an epoch).
        val_windows: fixed validation windows.
        seed: of the training windows; independent of the run's seed.
        root: where the modules are; default the running Python's standard library.
    """

    vocab = VOCAB

    def __init__(self, context: int = 128, batch_size: int = 32, train_windows: int = 200_000,
                 val_windows: int = 256, seed: int = 0, root: Optional[str] = None, vocab: int = VOCAB) -> None:
        super().__init__()
        self.context = _positive("context", context)
        self.batch_size = _positive("batch_size", batch_size)
        self.train_windows = _positive("train_windows", train_windows)
        self.val_windows = _positive("val_windows", val_windows)
        if vocab != VOCAB:
            raise ValueError(f"data.vocab is {VOCAB} (tokens are bytes), got {vocab!r}; leave it as it is")
        if self.train_windows < self.batch_size:
            raise ValueError(f"data.train_windows ({train_windows}) is smaller than data.batch_size "
                             f"({batch_size}): not one full training batch")
        self.seed = seed
        self.root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
        self.train_set: Optional[Windows] = None
        self.val_set: Optional[Windows] = None
        self._described: dict = {}

    def _split(self, files: tuple[str, ...], name: str) -> tuple[torch.Tensor, list[str], list[str]]:
        text, found, missing = read_corpus(self.root, files)
        if len(text) <= self.context + 1:
            raise ValueError(f"the {name} split of the corpus in {self.root} has {len(text)} bytes ({len(found)} of "
                             f"{len(files)} pinned files found), too few for one window of data.context + 1 = "
                             f"{self.context + 1}; point data.root at a Python {PINNED_PYTHON[:4]}x standard library")
        return torch.frombuffer(bytearray(text), dtype=torch.uint8), found, missing

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        train, train_found, train_missing = self._split(TRAIN_FILES, "training")
        val, val_found, val_missing = self._split(VAL_FILES, "validation")
        self.train_set = train_windows(train, self.context, self.train_windows, self.seed)
        self.val_set = val_windows(val, self.context, self.val_windows)
        sha = corpus_hash(self.root, train_found + val_found)
        self._described = {
            "source": f"Python {sys.version.split()[0]} standard library, {self.root}",
            "files": {"train": train_found, "val": val_found}, "missing": train_missing + val_missing,
            "bytes": {"train": len(train), "val": len(val)}, "sha256": sha, "pinned_sha256": PINNED_SHA256,
            "matches_pinned": sha == PINNED_SHA256, "tokens": "bytes", "vocab": VOCAB,
            "windows": {"train": len(self.train_set), "val": len(self.val_set), "context": self.context},
        }
        if sha != PINNED_SHA256:
            from lightning.pytorch.utilities import rank_zero_warn

            missing = f"; missing: {', '.join(train_missing + val_missing)}" if train_missing + val_missing else ""
            rank_zero_warn(f"data=text: the corpus (SHA-256 {sha[:12]}…, Python {sys.version.split()[0]}) differs "
                           f"from the pinned one (Python {PINNED_PYTHON}){missing}: losses are not comparable with "
                           "figures taken on the pinned corpus")

    def describe(self) -> dict:
        """What the run read: files, bytes, hash (for ``result.json``); empty before ``setup``."""
        return dict(self._described)

    def train_dataloader(self) -> DataLoader:
        # The windows are already in random order; under a distributed strategy Lightning puts a
        # DistributedSampler over the data-parallel replicas in place of the sequential one.
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 64))
