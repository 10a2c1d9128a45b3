"""The runner's supervision of the program: threads for its pipes and for reaping, OOM
evidence from the container's cgroup, killing what is left, and the runner's hardening."""

# Only C modules are imported (as in _runner_main.py, whose start-up cost this is part of).
from __future__ import annotations

import _signal as signal
import _thread
import os
import sys
import time

CHUNK = 64 * 1024

# cgroup files that count OOM kills: v1 memory.oom_control ("oom_kill N", kernel >= 4.13)
# and v2 memory.events ("oom_kill N"); memory.failcnt counts hits of the v1 limit.
OOM_COUNTER_FILES = (
    "/sys/fs/cgroup/memory/memory.oom_control",
    "/sys/fs/cgroup/memory.events",
)
FAILCNT_FILE = "/sys/fs/cgroup/memory/memory.failcnt"


class Flag:
    """``threading.Event`` on a bare lock, set once (threading's imports are not paid)."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            self._lock.release()
            return True
        return False


class Worker:
    """A daemon thread running ``self.work()``; ``done`` is set when it returns."""

    def __init__(self) -> None:
        self.done = Flag()

    def start(self) -> None:
        _thread.start_new_thread(self._main, ())

    def join(self, timeout: float) -> None:
        self.done.wait(timeout)

    def _main(self) -> None:
        try:
            self.work()
        finally:
            self.done.set()

    def work(self) -> None:
        raise NotImplementedError


class Capture(Worker):
    """Reads one output pipe to EOF, keeping the first ``limit`` bytes and counting the rest."""

    def __init__(self, fd: int, limit: int) -> None:
        super().__init__()
        self.fd = fd
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def work(self) -> None:
        try:
            while chunk := os.read(self.fd, CHUNK):
                room = self.limit - len(self.data)
                if room > 0:
                    self.data += chunk[:room]
                self.total += len(chunk)
        finally:
            os.close(self.fd)


class Feeder(Worker):
    """Writes the program's stdin into its pipe, then closes it (EOF for the program)."""

    def __init__(self, fd: int, data: bytes) -> None:
        super().__init__()
        self.fd = fd
        self.data = data

    def work(self) -> None:
        view = memoryview(self.data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            pass  # the program exited or closed stdin: the rest is not wanted
        finally:
            os.close(self.fd)


class Reaper(Worker):
    """Waits for every child of PID 1, recording the program's status when it ends.

    Started before the program is spawned (a fork bomb could exhaust the pids limit and leave
    no room for a new thread later); it blocks until ``watch`` names the program's pid.
    """

    def __init__(self) -> None:
        super().__init__()
        self.main_pid = 0
        self.main_status: int | None = None
        self.main_done = Flag()
        self._go = Flag()

    def watch(self, pid: int) -> None:
        self.main_pid = pid
        self._go.set()

    def work(self) -> None:
        self._go.wait()
        while True:
            try:
                pid, status, _ = os.wait4(-1, 0)
            except ChildProcessError:
                break  # no children left at all
            except InterruptedError:
                continue
            if pid == self.main_pid:
                self.main_status = status
                self.main_done.set()
        self.main_done.set()  # also if the program vanished without a status


def prctl(option: int, *args: object) -> int:
    """prctl(2), called through ``_ctypes`` (the ctypes package adds ~3 CPU-ms of imports
    to every start); these few lines are what ``ctypes.CDLL(None).prctl`` sets up. An int
    argument is passed as a C int, a ``_ctypes`` array as a pointer to its first byte."""
    import _ctypes

    class CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL
        _restype_ = CInt

    class Libc:
        _handle = _ctypes.dlopen(None)

    padded = (*args, 0, 0, 0, 0)[:4]
    return Function(("prctl", Libc()))(option, *padded)


def install_seccomp_filter(path: str) -> None:
    """Put this process (and so every process it forks later) under the seccomp filter
    at ``path``: a classic-BPF program, the one runc compiled for the engine's sandbox
    config (the runc backend hands its runners that program instead of having runc compile
    it per container; see sandboxes/seccomp_filter.py). Raises OSError when it is not in
    place afterwards: the caller must then not run anything."""
    import _ctypes

    with open(path, "rb") as f:
        program = f.read()
    if not program or len(program) % 8 or len(program) // 8 > 4096:  # BPF_MAXINSNS
        raise OSError(f"{path} is not a BPF program ({len(program)} bytes)")

    class Char(_ctypes._SimpleCData):
        _type_ = "c"

    class Instructions(_ctypes.Array):
        _type_ = Char
        _length_ = len(program)

    class SockFprog(_ctypes.Array):  # struct sock_fprog: u16 len, padding, the pointer
        _type_ = Char
        _length_ = 16

    instructions = Instructions.from_buffer_copy(program)
    fprog = SockFprog.from_buffer_copy(
        (len(program) // 8).to_bytes(2, sys.byteorder)
        + bytes(6)
        + _ctypes.addressof(instructions).to_bytes(8, sys.byteorder)
    )
    # PR_SET_SECCOMP, SECCOMP_MODE_FILTER; allowed unprivileged because runc set
    # no_new_privs. The runner has no thread yet, so no other thread escapes it.
    if prctl(22, 2, fprog) != 0:
        raise OSError("prctl(PR_SET_SECCOMP) refused the filter")
    with open("/proc/self/status", "rb") as f:
        if b"\nSeccomp:\t2\n" not in f.read():
            raise OSError("the seccomp filter is not in place after prctl")


def harden_self() -> None:
    """Make PID 1 non-dumpable: /proc/1/* becomes root-owned, unreachable for the program."""
    try:  # noqa: SIM105 (contextlib is not imported, see above)
        prctl(4, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError, ImportError):
        pass  # best effort: the host also checks the frame's nonce
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the host (SIGKILL) ends the runner


def read_counter(path: str, key: str | None) -> int | None:
    """An integer from a cgroup file: the whole file, or the value after ``key``."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if key is None:
        try:
            return int(text.strip())
        except ValueError:
            return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def oom_counters() -> dict[str, int]:
    """Snapshot of every visible OOM-related counter of this container's memory cgroup."""
    found: dict[str, int] = {}
    for path in OOM_COUNTER_FILES:
        value = read_counter(path, "oom_kill")
        if value is not None:
            found[path] = value
    failcnt = read_counter(FAILCNT_FILE, None)
    if failcnt is not None:
        found[FAILCNT_FILE] = failcnt
    return found


def judge_oom(before: dict[str, int], after: dict[str, int], killed_by_kill: bool) -> list[str]:
    """Evidence that the OOM killer struck during this run; empty list when there is none.

    An oom_kill counter that went up is proof. Without one (v1 kernels before 4.13), a
    SIGKILL the runner did not send plus a memory.failcnt that went up is the best signal.
    With no counters at all (gVisor shows no cgroupfs) nothing is claimed here: a SIGKILL
    alone may be the program's own doing, and gVisor's memory limit is enforced on the
    whole sandbox from outside, which the host sees as the container's exit 137.
    """
    evidence = []
    kill_counters = [p for p in after if p != FAILCNT_FILE]
    for path in kill_counters:
        delta = after[path] - before.get(path, 0)
        if delta > 0:
            evidence.append(f"{os.path.basename(path)}:oom_kill+{delta}")
    if evidence or kill_counters or not killed_by_kill or FAILCNT_FILE not in after:
        return evidence
    delta = after[FAILCNT_FILE] - before.get(FAILCNT_FILE, 0)
    return [f"sigkill+failcnt+{delta}"] if delta > 0 else []


def kill_everything() -> None:
    """SIGKILL every process of the namespace except PID 1, until none is left to signal."""
    for _ in range(200):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return  # nothing left to signal
        except PermissionError:
            return
        time.sleep(0.005)


def raise_oom_score(pid: int) -> None:
    """Prefer the program (and its descendants, which inherit it) as the OOM victim."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
