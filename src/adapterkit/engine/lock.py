"""One training run per output directory.

``OUTPUT/train.lock`` carries an OS lock (``fcntl.flock``) for as long as a run holds it,
and says who holds it (pid, host, start time, command). The OS drops the lock when the
holding process exits, however it exits (SIGKILL, a crash, a power cut of the process),
so a lock cannot outlive its run: a ``train.lock`` file whose lock is free is the stale
leftover of a run that did not finish; the next run reports it ("cleared a stale lock
left by pid N ...") and takes it over. A finished run removes the file.

A second run on the same output refuses at once, naming the holder. Should the lock be
held although the named process is gone (a child process it started inherited the lock),
``fuser OUTPUT/train.lock`` names the process that holds it; stopping that process frees it.

Within one process the lock is re-entrant (the CLI takes it before building the model,
``Trainer.fit`` takes it again). POSIX only: where ``fcntl`` or ``flock`` is unavailable
(Windows, some network file systems), runs proceed unlocked with a note saying so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from adapterkit.errors import CheckpointError
from adapterkit.safeio import describe_os_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_NAME", "RunLock", "pid_alive"]

LOCK_NAME = "train.lock"

# path of a lock held by this process -> [its RunLock, how many times it was taken]
_HELD: dict[str, list[Any]] = {}
_HELD_GUARD = threading.Lock()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "a process that left no details (the lock file is empty or unreadable)"
    pid, host = info.get("pid", "?"), info.get("host", "?")
    started = info.get("started", "?")
    cmd = info.get("command")
    return f"pid {pid} on {host}, started {started}" + (f" ({cmd})" if cmd else "")


class RunLock:
    """The lock on one output directory; ``with RunLock(out):`` or ``acquire()`` / ``release()``.

    After a successful :meth:`acquire`, ``cleared_stale`` holds the details of a dead run's
    lock file that was taken over (else None) and ``note`` a line saying so (or that the
    file system cannot lock)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None
        self._key: str | None = None
        self.cleared_stale: dict[str, Any] | None = None
        self.note: str | None = None
        self.held = False
        self._created: list[Path] = []  # the folders acquire() made, deepest first
        self._owner_pid: int | None = None  # the process that took the lock file

    # -- acquire / release ------------------------------------------------------------------

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`CheckpointError` naming its holder."""
        if self.held:
            return self
        created = []  # the folders this acquire makes, deepest first: a run that fails before
        d = self.output_dir.absolute()  # writing anything leaves no empty output behind
        while not d.exists() and d != d.parent:
            created.append(d)
            d = d.parent
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create output directory {self.output_dir}: {describe_os_error(exc)}") \
                from exc
        key = os.path.realpath(self.path)
        with _HELD_GUARD:
            entry = _HELD.get(key)
            if entry is not None and entry[0]._owner_pid == os.getpid():
                entry[1] += 1
                self._key, self.held = key, True
                return self
            try:
                self._lock_file()
            except BaseException:
                self._created = created
                self._remove_empty_created()
                raise
            self._key, self.held = key, True
            self._created = created
            _HELD[key] = [self, 1]
        return self

    def _remove_empty_created(self) -> None:
        """Remove the folders :meth:`acquire` made that are still empty (rmdir never removes a
        folder with anything in it: a run's checkpoints, logs or results stay)."""
        for d in self._created:
            try:
                d.rmdir()
            except OSError:
                break  # not empty (or gone): its parents are not empty either
        self._created = []

    def _lock_file(self) -> None:
        self._owner_pid = os.getpid()
        if fcntl is None:  # pragma: no cover - Windows
            self.note = f"cannot lock {self.path} on this platform: a second run on this output would not be refused"
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        for _ in range(20):  # a holder may remove the file between our open and our lock: retry
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise CheckpointError(f"{self.path} is a symbolic link; remove it (adapterkit writes only "
                                          "regular files in a run directory)") from None
                raise CheckpointError(f"cannot open the run lock {self.path}: {describe_os_error(exc)}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = self._read(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(self._held_message(holder)) from None
                self.note = (f"cannot lock {self.path} ({describe_os_error(exc)}; a network file system?): "
                             "a second run on this output would not be refused")
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its last holder had already removed
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous and previous.get("pid") != os.getpid():
                self.cleared_stale = previous
                self.note = self._stale_message(previous)
            self._fd = fd
            self._write(fd)
            return
        raise CheckpointError(f"could not take the run lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Give the lock back (the outermost release removes the lock file)."""
        if not self.held:
            return
        self.held = False
        with _HELD_GUARD:
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self._key]
            owner: RunLock = entry[0]
        owner._unlock()

    def _unlock(self) -> None:
        fd, self._fd = self._fd, None
        mine = self._owner_pid == os.getpid()  # a forked child must not touch its parent's
        if fd is not None:
            if mine:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(fd)
        if mine:
            self._remove_empty_created()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the lock file's contents -----------------------------------------------------------

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            raw = os.pread(fd, 65536, 0)
            info = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    @staticmethod
    def _write(fd: int) -> None:
        now = time.time()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_unix": now,
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
                "command": " ".join(sys.argv)[:500]}
        data = (json.dumps(info) + "\n").encode("utf-8")
        with contextlib.suppress(OSError):  # the details are for people; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)

    def _held_message(self, holder: dict[str, Any] | None) -> str:
        msg = (f"output directory {self.output_dir} is in use by another training run: {_describe(holder)}. "
               "Wait for it to finish, stop it, or train into another --output.")
        if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not pid_alive(holder["pid"]):
            msg += (f" pid {holder['pid']} is no longer running, but a process it started still holds the lock"
                    f" on {self.path}: `fuser {self.path}` names it; stop that process to free the lock.")
        else:
            msg += (f" The lock ({self.path}) is released when that process exits; if it is gone and the lock "
                    f"stays, `fuser {self.path}` names the process holding it.")
        return msg

    def _stale_message(self, info: dict[str, Any]) -> str:
        pid, host = info.get("pid"), info.get("host")
        if host == socket.gethostname() and isinstance(pid, int):
            state = "is no longer running" if not pid_alive(pid) else "no longer holds it (the pid was reused)"
        else:
            state = "no longer holds it"
        return (f"cleared a stale lock left by {_describe(info)}: that process {state}, its run did not finish; "
                "resuming from its last checkpoint")
