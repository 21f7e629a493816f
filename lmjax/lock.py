"""One writer per workdir: a lock file naming the run that holds it.

    with WorkdirLock(workdir):      # WorkdirLockedError if another live run holds it
        ...                         # train; the file is removed at exit

`WORKDIR/lmjax.lock` holds JSON {host, pid, pid_start, start_time, command}. It is created with
O_CREAT | O_EXCL, so of two runs starting together exactly one gets it. A lock whose holder is
gone (same host, and the pid no longer exists or is another process: its start time in
/proc/PID/stat differs) is stale: a SIGKILLed run leaves one, and the next run takes it over with
a warning. A lock held from another host cannot be checked from here: it is an error that says
which host and which file to remove if that run is dead.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys

from absl import logging

LOCK_FILE = "lmjax.lock"


class WorkdirLockedError(RuntimeError):
    """Another run writes to this workdir."""


def _pid_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder (on this host) still runs: its pid exists and started when it said."""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    start = _pid_start(pid)
    return start is None or holder.get("pid_start") in (None, start)


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
            f"{holder.get('start_time')} ({holder.get('command', '?')})")


class WorkdirLock:
    """The lock of `workdir` for this process (see the module docstring). `enabled=False` (the
    processes of a multi-host run other than 0) makes it a no-op."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.enabled = enabled
        self._held = False
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "pid_start": _pid_start(os.getpid()),
                     "start_time": datetime.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv)[:300]}

    def acquire(self) -> "WorkdirLock":
        if not self.enabled or self._held:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):  # at most one stale lock to take over
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None or not self._is_stale(holder):
                    raise WorkdirLockedError(self._held_message(holder)) from None
                logging.warning("taking over the lock of %s: its holder (%s) is gone",
                                os.path.dirname(self.path), describe(holder))
                print(f"WARNING: {self.path} was left by a run that is gone ({describe(holder)}); "
                      "taking it over.", flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self._held = True
            return self
        raise WorkdirLockedError(self._held_message(self._read()))

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}  # released meanwhile: stale, try again
        except (OSError, ValueError):
            return None  # being written, or not ours: held

    def _is_stale(self, holder: dict) -> bool:
        return not holder or (holder.get("host") == self.info["host"] and not _alive(holder))

    def _held_message(self, holder: dict | None) -> str:
        who = describe(holder) if holder else "a run whose lock file cannot be read"
        remote = holder and holder.get("host") != self.info["host"]
        return (f"workdir {os.path.dirname(self.path)} is in use by {who}: one run writes to a "
                f"workdir at a time. Wait for it, stop it, or use another --workdir"
                + (f"; if that run on {holder.get('host')!r} is dead, remove {self.path}"
                   if remote else ""))

    def release(self) -> None:
        """Removes the lock file if this process holds it."""
        if not self._held:
            return
        self._held = False
        holder = self._read()
        if holder and holder.get("pid") == self.info["pid"] and (
                holder.get("host") == self.info["host"]):
            os.remove(self.path)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
