"""Processes of the Ray clusters the tests start: found by a marker in their environment (every process a node
starts inherits it, whatever its title), killed by pid, never by name."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import psutil

MARK = "KEDIT_TEST_RAY"


def new_mark() -> str:
    return uuid.uuid4().hex


def marked(mark: str) -> list[psutil.Process]:
    """The live processes whose environment holds MARK=mark."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(processes, timeout=10)


class KillWhenBusy(threading.Thread):
    """Kills (SIGKILL) the first process of `mark` whose title starts with `prefix` (Ray titles an actor's process
    "ray::Class.method" while it runs that method) once `ready()` holds; `killed` is its pid."""

    def __init__(self, mark: str, prefix: str, ready=lambda: True, timeout: float = 300.0):
        super().__init__(daemon=True)
        self.mark, self.prefix, self.ready, self.timeout = mark, prefix, ready, timeout
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.ready():
                for p in marked(self.mark):
                    if title(p).startswith(self.prefix):
                        p.send_signal(signal.SIGKILL)
                        self.killed = p.pid
                        return
            time.sleep(0.02)
