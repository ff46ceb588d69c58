"""Checkpoint directories on disk: read safely, and replaced whole.

A ``PhantomStrategy`` checkpoint is a directory: DCP's ``.metadata`` and shard files, and
``meta.pt`` (loops, schedulers, the layout). Written in place, a crash half-way would leave
the new shards beside the old ``meta.pt`` — a checkpoint that loads and is wrong. So the
strategy writes into ``staging_path(path)`` (hidden, and not named ``*.ckpt``, so Lightning's
search for ``last.ckpt`` never picks it up) and ``publish``-es it once every rank is done:
one ``renameat2(RENAME_EXCHANGE)`` swaps old and new where Linux supports it; elsewhere (NFS,
Lustre) the old one is renamed to ``previous_path(path)`` first, and if the crash came between
the two renames, ``ckpt_path="last"`` finds it there, and loading ``path`` falls back to it.
DCP's ``.metadata`` is a pickle: ``SafeFileSystemReader`` reads it admitting only DCP's own classes.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta

PathLike = Union[str, os.PathLike]


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only DCP's own classes, dtypes, sizes and paths."""

    _MODULES = ("torch.distributed.checkpoint.metadata",)
    _NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
              ("torch.serialization", "_get_layout"), ("torch", "Size"), ("pathlib", "PosixPath"),
              ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
              ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module, name) in self._NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a "
                                     "PhantomStrategy checkpoint never contains; refusing to load it.")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader with the metadata file read by ``_MetadataUnpickler`` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        get_path = getattr(self, "_get_metadata_path", None)
        path = get_path(kwargs.get("rank")) if get_path else Path(self.path) / ".metadata"
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------ atomic replace
def staging_path(path: PathLike) -> Path:
    """Where the checkpoint for ``path`` is written before it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def previous_path(path: PathLike) -> Path:
    """Where the checkpoint at ``path`` waits while a new one replaces it without RENAME_EXCHANGE.

    ``last.ckpt`` → ``last.previous.ckpt``: visible and named like the checkpoint, so that when a
    crash between the two renames left only this one, ``trainer.fit(ckpt_path="last")`` finds it
    (Lightning resolves "last" itself, to the newest ``last*.ckpt`` in ModelCheckpoint's folder)
    instead of silently training from scratch. Where both exist, the new one is newer.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def discard(path: PathLike) -> None:
    """Remove a file, link or directory tree if it exists."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def save_durably(obj: Any, path: PathLike) -> None:
    """``torch.save`` and fsync, so the file is on disk before the directory holding it is published."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def publish(staging: PathLike, path: PathLike) -> None:
    """Move the complete checkpoint ``staging`` to ``path``, replacing what is there.

    At every moment ``path`` or ``previous_path(path)`` holds a whole checkpoint.
    """
    staging, path = Path(staging), Path(path)
    if path.is_symlink() or path.is_file():  # a link from save_last="link", or a single-file checkpoint
        path.unlink()
    previous = previous_path(path)
    if not path.exists():
        os.rename(staging, path)
    elif _exchange(staging, path):
        discard(staging)  # now the old checkpoint
    else:
        discard(previous)
        os.rename(path, previous)
        os.rename(staging, path)
    discard(previous)  # also what a save cut between those two renames left
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False  # this kernel or filesystem cannot: fall back to two renames
    raise OSError(code, f"cannot replace {str(b)!r} with {str(a)!r}: {os.strerror(code)}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename itself is what matters
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
