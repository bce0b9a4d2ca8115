"""Claims: so that runners sharing one results folder never compute the same thing twice.

Two ``kdbench run`` processes started on the same suite and folder (by hand, by a
scheduler, or one per machine on a shared disk) divide the work between them: a
runner *claims* a run (or a teacher) before computing it and skips what another
runner holds.

A claim is an exclusive ``flock`` on ``<folder>/.claims/<name>.lock``, held by an
open file.  The operating system drops the lock when its process ends for any reason
(a crash, Ctrl-C, ``kill -9``, a lost node on a local disk), so a claim left by a dead
process never blocks anyone: there is no timeout to tune and no heartbeat.  A lock
file is removed by its holder on release, while still locked; a runner that locked a
file which was removed meanwhile sees that its inode is no longer the one at the
path, and tries again.

Limits: ``flock`` must work on the folder's file system (local disks do; NFS maps it
to POSIX locks on Linux).  On a platform without ``fcntl`` every claim succeeds, so
concurrent runners there may compute a run twice (the records stay consistent, as
each is written atomically).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdbench._io import current_umask

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Claim:
    """An acquired claim; :meth:`release` (or the end of its process) frees it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Removed while still locked: a runner that opened the old file sees the
            # inode change and retries, so no two runners ever hold "the" claim.
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


class Claims:
    """Claims on names (run records, teacher checkpoints) under ``folder/.claims``."""

    def __init__(self, folder: Path) -> None:
        self.dir = Path(folder) / ".claims"

    def _path(self, name: str) -> Path:
        return self.dir / (_SAFE.sub("_", name) + ".lock")

    def acquire(self, name: str, *, wait: bool = False) -> Claim | None:
        """Claim ``name``: the claim, or None when another live process holds it (``wait=False``)."""
        path = self._path(name)
        if fcntl is None:  # pragma: no cover - not POSIX
            return Claim(path, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return Claim(path, fd)
            os.close(fd)  # the holder released it and removed the file under us: retry

    @contextmanager
    def hold(self, name: str, *, wait: bool = False) -> Iterator[Claim | None]:
        """``with claims.hold(name) as claim:`` -- released on exit, exceptions and Ctrl-C included."""
        claim = self.acquire(name, wait=wait)
        try:
            yield claim
        finally:
            if claim is not None:
                claim.release()
