"""The seccomp filters a running process is under, as the kernel holds them.

The runc backend takes the filter the engine's runc compiled for a sandbox (Docker's default
profile, from the engine's own config) once per image, from a sandbox container's runner,
and has each of its containers' runners install that same program (see
``sandboxes.runc_bundle``): libseccomp's compilation of the ~360-syscall profile is ~15 of
a runc container's ~85 CPU-ms, paid per container when runc does it.

``PTRACE_SECCOMP_GET_FILTER`` needs root (``CAP_SYS_ADMIN`` and ``CAP_SYS_PTRACE``) and a
kernel with ``CONFIG_CHECKPOINT_RESTORE``; the process is stopped for the moment it takes.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["SOCK_FILTER_BYTES", "read_filters"]

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000  # __WALL: wait for a tracee that is not our child
SOCK_FILTER_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


def read_filters(pid: int) -> list[bytes]:
    """The classic-BPF programs of the filters ``pid`` runs under, the most recently
    installed first (each a run of ``struct sock_filter``); [] when it has none."""
    libc = ctypes.CDLL(None, use_errno=True)
    ptrace = libc.ptrace
    ptrace.restype = ctypes.c_long
    ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

    def call(request: int, addr: int | None, data: ctypes.Array[ctypes.c_char] | None) -> int:
        result = int(ptrace(request, pid, addr, data))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"ptrace({request:#x}) of {pid}: {os.strerror(code)}")
        return result

    # Seize + interrupt rather than attach: no SIGSTOP is queued for the process to see later.
    call(PTRACE_SEIZE, None, None)
    try:
        call(PTRACE_INTERRUPT, None, None)
        os.waitpid(pid, WALL)
        filters: list[bytes] = []
        while True:
            try:
                count = call(PTRACE_SECCOMP_GET_FILTER, len(filters), None)
            except OSError as exc:
                # ENOENT: past the oldest filter; EINVAL first: not in filter mode at all.
                if exc.errno == errno.ENOENT or (exc.errno == errno.EINVAL and not filters):
                    return filters
                raise
            buffer = ctypes.create_string_buffer(count * SOCK_FILTER_BYTES)
            got = call(PTRACE_SECCOMP_GET_FILTER, len(filters), buffer)
            filters.append(buffer.raw[: got * SOCK_FILTER_BYTES])
    finally:
        ptrace(PTRACE_DETACH, pid, None, None)
