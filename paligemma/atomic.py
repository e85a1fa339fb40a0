"""All-or-nothing saves: one file (`atomic_file`) or a set of files (`atomic_files`) into a directory.

A save never touches the files it replaces until every new file is complete. New files are written
under unique temporary names in the target directory (a private staging directory for a set), then
fsynced and renamed over their targets (`os.replace`, atomic on POSIX and Windows). A set is swapped
in under an exclusive lock on the directory, keeping a hard link to each file it replaces, so an
error during the swap restores the old set. The temporary names are unique per save, so processes
saving into one directory never touch each other's files; with the lock the last swap wins whole.
Files get ordinary permissions (0o666 less the umask), not the 0o600 of `tempfile`.

What remains outside these guarantees: a power cut or a kill in the middle of the swap (a few renames)
can leave a mixed set; a killed save leaves hidden `.paligemma-*` entries behind (safe to delete).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError

PREFIX = ".paligemma-"  # staging directories and temporary files; hidden, never a checkpoint file name

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; renames stay atomic file by file
    fcntl = None


class SaveError(CheckpointError):
    """A save failed (no space, no permission, read-only disk, ...); the previous files are unchanged."""


def file_mode() -> int:
    """0o666 less the process umask: what open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fsync_path(directory)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory; the renames still happened
        pass


def _failure(target: Path, e: OSError) -> SaveError:
    return SaveError(f"cannot save to {target}: {e.strerror or e}"
                     f"{f' ({e.filename})' if e.filename else ''}; the files there before are unchanged")


def _make_dir(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise SaveError(f"cannot save to {directory}: it is a file, not a directory; choose another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _failure(directory, e) from None


def atomic_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` writes the whole file; it then replaces `path` atomically. On any error the old
    `path` is untouched, the temporary file removed, and a `SaveError` raised."""
    path = Path(path)
    _make_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{PREFIX}{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise _failure(path, e) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on the directory itself (no lock file left behind)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def atomic_files(directory: str | os.PathLike, stale: Callable[[Path], Iterable[Path]] | None = None
                 ) -> Iterator[Path]:
    """Yield a staging directory; write the new files there. On a clean exit every staged file replaces
    its namesake in `directory`, then the files `stale(directory)` lists that the new set does not hold
    are removed (old shards, an old index). On an error nothing in `directory` changes."""
    directory = Path(directory)
    _make_dir(directory)
    try:
        stage = Path(tempfile.mkdtemp(dir=directory, prefix=f"{PREFIX}save-"))
    except OSError as e:
        raise _failure(directory, e) from None
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        mode = file_mode()
        for name in names:
            os.chmod(stage / name, mode)
            fsync_path(stage / name)
        with _locked(directory):
            _swap(stage, directory, names, stale)
        _fsync_dir(directory)
    except OSError as e:
        raise _failure(directory, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap(stage: Path, directory: Path, names: list[str], stale: Callable[[Path], Iterable[Path]] | None) -> None:
    """Move the staged files in; on an error put back every replaced file and remove the new ones."""
    backups: dict[str, Path | None] = {}  # name -> hard link to the file it replaced (None: there was none)
    try:
        for name in names:
            target = directory / name
            backups[name] = None
            if target.exists():
                backups[name] = stage.with_name(f"{stage.name}.old-{name}")
                try:
                    os.link(target, backups[name])
                except OSError:  # no hard links here (FAT, some network shares): move it aside instead
                    os.replace(target, backups[name])
            os.replace(stage / name, target)
        leftovers = [p for p in (stale(directory) if stale else []) if p.name not in backups]
    except BaseException:
        for name, backup in backups.items():
            if backup is not None:
                os.replace(backup, directory / name)
            else:
                (directory / name).unlink(missing_ok=True)
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)
    for path in leftovers:
        path.unlink(missing_ok=True)
