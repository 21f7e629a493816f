"""The workdir lock: one holder, named to whoever else tries; stale locks of dead processes taken
over; another host's lock never taken. (Two real training runs: tests/test_checkpoint.py.)"""
import json
import os
import socket
import subprocess
import sys

import pytest

from lmjax import lock as lock_lib


def _write(path, **holder):
    with open(path, "w") as f:
        json.dump(holder, f)


def test_second_holder_is_refused_with_the_first_named(tmp_path):
    first = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    held = json.load(open(first.path))
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(lock_lib.WorkdirLockedError) as e:
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert f"pid {os.getpid()} on host {socket.gethostname()!r}" in str(e.value)
    assert held["start_time"] in str(e.value)
    first.release()
    assert not os.path.exists(first.path)
    with lock_lib.WorkdirLock(str(tmp_path)):  # free again
        assert os.path.exists(first.path)
    assert not os.path.exists(first.path)


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone (reaped)
    path = os.path.join(str(tmp_path), lock_lib.LOCK_FILE)
    _write(path, host=socket.gethostname(), pid=dead.pid, pid_start="1", start_time="then")
    lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert json.load(open(path))["pid"] == os.getpid()
    assert f"pid {dead.pid}" in capsys.readouterr().out
    lock.release()


def test_lock_of_a_reused_pid_is_taken_over(tmp_path):
    """The recorded pid runs, but it is another process (its start time differs)."""
    path = os.path.join(str(tmp_path), lock_lib.LOCK_FILE)
    _write(path, host=socket.gethostname(), pid=os.getpid(), pid_start="-1", start_time="then")
    lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert json.load(open(path))["pid_start"] == lock_lib._pid_start(os.getpid())
    lock.release()


def test_lock_of_another_host_is_never_taken(tmp_path):
    path = os.path.join(str(tmp_path), lock_lib.LOCK_FILE)
    _write(path, host="elsewhere", pid=1, start_time="then")
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"if that run on 'elsewhere' is dead, "
                                                          f"remove {path}"):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert json.load(open(path))["host"] == "elsewhere"


def test_other_processes_of_a_multihost_run_do_not_lock(tmp_path):
    with lock_lib.WorkdirLock(str(tmp_path)):
        with lock_lib.WorkdirLock(str(tmp_path), enabled=False):  # process_index() != 0
            pass
        assert os.path.exists(os.path.join(str(tmp_path), lock_lib.LOCK_FILE))
