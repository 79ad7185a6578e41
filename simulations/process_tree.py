"""Processes on this machine through Linux ``/proc`` (with a ``ps`` fallback): status, parents,
descendants, environments, signals. The deployment harness uses them to supervise and tear down
everything it starts, including Flower's detached descendants."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # Fields after the command name, which is in parentheses and may contain spaces.
    return raw[raw.rfind(")") + 2:].split()


def start_time(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    if Path("/proc/self/stat").exists():
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = proc_stat(int(entry))
                if fields and len(fields) > 1:
                    parents[int(entry)] = int(fields[1])
        return parents
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            pid, ppid = line.split()
            parents[int(pid)] = int(ppid)
    return parents


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_map().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = proc_stat(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pids_with_environ(marker: bytes) -> list[int]:
    """Live processes (other than this one) whose environment contains ``marker``; empty without /proc."""
    found = []
    if not Path("/proc/self/environ").exists():
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ and alive(int(entry)):
                found.append(int(entry))
    return found


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> None:
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if alive(p)}
        if pending:
            time.sleep(0.05)
