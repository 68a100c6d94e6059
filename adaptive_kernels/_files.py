"""Every file the package writes: written atomically, and its path checked before the work that produces it.

``atomic_path(path)`` hands out a temporary file in ``path``'s folder; when the block ends it is flushed to disk
(fsync), ``os.replace``d over ``path`` and the folder fsynced. A process killed at any moment, a full disk or an
error in the block leaves either the previous complete file or the new complete one at ``path``, never a partial
one; on an error the temporary file is removed, and one left by a kill (``.NAME.*.tmp`` beside ``path``) is
removed by the next run's ``check_output_file``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by name: ``torch.save``, ``onnx.save``, ``savefig`` with an
    explicit format); it becomes ``path`` when the block ends without an exception, else it is removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_current_umask())  # mkstemp's 0600 would ignore the user's umask
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed its own handle without fsync
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the target is untouched; do not leave the partial temp file behind.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted ``atomic_path(path)`` left beside ``path`` (a kill -9 between
    creating and renaming one). Call it only while no other process writes that file."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def check_output_file(path: str | os.PathLike, flag: str | None = None) -> Path:
    """Prove now, before the work that produces it, that a file can be written at ``path``: its folder exists
    (it is not created: a typo would leave folders about), is a folder and takes new files, and ``path`` is not a
    folder or a read-only file. Then removes what an interrupted earlier write left beside it. Raises ValueError
    naming ``flag`` (a command-line flag) or the path."""
    path = Path(path)
    what = f"{flag} {path}" if flag else f"cannot write {path}"
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{what}: it is a folder; give a file name, e.g. {path / ('out' + (path.suffix or '.json'))}")
    if not folder.exists():
        raise ValueError(f"{what}: the folder {folder} does not exist (create it first)")
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is not a folder")
    try:
        # os.access is not enough (root, ACLs, read-only mounts): really create a file where the write will.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{what}: the folder is not writable ({e.strerror or e}); choose another path") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what}: the file exists and is read-only; choose another path")
    remove_stale_temp_files(path)
    return path


def _current_umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable across a power loss. Not possible on every OS/file system (Windows): skip there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
