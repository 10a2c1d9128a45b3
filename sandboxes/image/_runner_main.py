"""ActionFleet sandbox runner: PID 1 of every sandbox container (Python 3.11, stdlib only).

``runner.py`` is the entry script; this module holds the protocol and the run,
``_runner_program`` the program's process (forked at start, see below), ``_runner_supervise``
the threads, OOM evidence and hardening. The modules are compiled when the image is built
(a script would be compiled again on every start: ~2 CPU-ms here, ~4.5 for all three).

The runner receives one program on stdin, runs it under a deadline with its output captured,
reaps every process, and writes exactly one result frame to its own stdout. Its stdout
carries nothing but that frame; diagnostics go to stderr.

Protocol, version 1
===================

Request (container stdin, until EOF)::

    <header: one JSON object, UTF-8, terminated by b"\\n">
    <source: exactly header.source_len bytes, UTF-8>
    <program stdin: every remaining byte up to EOF>

Header fields:

    v             1 (optional; other versions are refused)
    language      "python" | "bash"
    source_len    int >= 0, byte length of the source
    timeout_s     float > 0, wall-clock deadline of the program, enforced here
    output_bytes  int >= 0, bytes kept per stream (stdout, stderr); the rest is counted
    nonce         str (optional), echoed in the response so the host can tell the real
                  frame from anything else that might reach the log stream
    max_procs     int (optional), RLIMIT_NPROC for the program. The host sends it under
                  gVisor, whose kernel counts processes per sandbox; under runc the limit
                  would be per host uid, shared by all sandboxes, so the pids cgroup is used

Response (runner stdout): one JSON object on one line (preceded by an empty line), then the
runner exits. The host must take the LAST line carrying its nonce; a refusal (ok=false) is
the only output of its run::

    v, nonce           as in the request (nonce null when the request was refused)
    ok                 true when the program was run; false for a bad request (+ "error")
    exit_code          int, or null when the program was killed by a signal
    signal             int signal number that killed the program, or null
    timed_out          true when the runner killed the program at its deadline
    oom_killed         true when the kernel's OOM killer killed a process of this run
    oom_evidence       list of str: why oom_killed was decided ("oom_kill+1", ...)
    stdout_b64, stderr_b64            first output_bytes of each stream, base64
    stdout_bytes, stderr_bytes        total bytes the program wrote to each stream
    stdout_truncated, stderr_truncated
    usage              {"utime_s", "stime_s", "maxrss_kb", "wall_ms"}; CPU and max RSS of
                       all reaped descendants (getrusage(RUSAGE_CHILDREN)), wall from spawn
                       to the program's exit

Exit status of the runner: 0 after a frame with ok=true, 2 after ok=false, 3 when it was
told to install a seccomp filter and could not (no frame: nothing ran).

Behaviour
=========
- The source is written to /work/main.py or /work/main.sh and run as ``python3 -u main.py``
  or ``bash main.sh`` in /work, in its own session and process group. The program's process
  is forked from the runner when the container starts, before the request (and its nonce)
  exists, and waits; a python program then runs in that interpreter, set up as
  ``python3 -u main.py`` would be (``run_python``), so no second interpreter starts per
  action. bash is exec'd.
- At the deadline every process in the container is SIGKILLed (``kill(-1)`` from PID 1 reaches
  every process of the PID namespace but the runner itself, including ones that called
  setsid()). The same happens right after the program exits, so background leftovers cannot
  hold the output pipes open.
- ``runner.py --seccomp-filter PATH`` (the runc backend's containers): before anything else
  (the program's fork, a thread, reading the request) the runner puts itself under the
  classic-BPF seccomp program at PATH, which its children inherit; it refuses to go on
  without it. Until then only the interpreter's start and this module's imports have run,
  none of it touching the request. The Docker backend's runc installs the same program
  before it execs the runner; the runc backend's template takes it from there.
- A reaper thread waits for every child (orphans are re-parented to PID 1), so zombies do not
  pile up against the pids limit.
- The runner makes itself non-dumpable, so the program (same uid) cannot open /proc/1/fd/1
  and write into the frame stream, and raises the program's oom_score_adj so that under
  memory pressure the kernel prefers the program over the runner.

The protocol is transport-agnostic: a warm pool can keep runners waiting in pre-started
containers and hand each one a request the same way.
"""

# Only C modules are imported: base64, json, signal, threading, ctypes and contextlib pull
# in re, enum, functools and collections, which cost ~15 of the ~25 CPU-ms this interpreter
# spent starting, once per action (measured in the image). Their C cores do the work here.
from __future__ import annotations

import _signal as signal
import binascii
import os
import resource
import sys
import time
from _json import encode_basestring_ascii, make_encoder, make_scanner

from _runner_program import SOURCE_FILES, WORKDIR, Program
from _runner_supervise import (
    Capture,
    Feeder,
    Reaper,
    harden_self,
    install_seccomp_filter,
    judge_oom,
    kill_everything,
    oom_counters,
    raise_oom_score,
)

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
SECCOMP_FLAG = "--seccomp-filter"
# After the program exits or is killed, how long to wait for pipes to drain and for the last
# processes to be reaped. Everything was SIGKILLed, so this only bounds a misbehaving kernel.
DRAIN_TIMEOUT_S = 2.0


class BadRequest(ValueError):
    """The request could not be parsed; reported as ok=false."""


# --------------------------------------------------------------------------- JSON


class _JSONSettings:
    """What ``_json``'s scanner reads from its context (``json.JSONDecoder``'s defaults,
    except that NaN and Infinity are refused)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not a JSON value")


def _unencodable(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_loads(text: str) -> object:
    """One JSON value, as ``json.loads`` would read it."""
    text = text.strip(" \t\r\n")
    try:
        value, end = _SCAN(text, 0)
    except StopIteration as stop:
        raise ValueError(f"expecting a JSON value at character {stop.value}") from None
    if end != len(text):
        raise ValueError(f"extra data at character {end}")
    return value


def json_dumps(value: object) -> str:
    """Compact ASCII JSON, as ``json.dumps(value, separators=(",", ":"))`` writes it."""
    return "".join(_ENCODE(value, 0))


_SCAN = make_scanner(_JSONSettings())
# (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys,
# allow_nan): no circular check, the frame is a tree we build.
_ENCODE = make_encoder(
    None, _unencodable, encode_basestring_ascii, None, ":", ",", False, False, True
)


# --------------------------------------------------------------------------- request


def parse_request(raw: bytes) -> tuple[dict, str, bytes]:
    """Split a raw request into (header, source, program stdin)."""
    newline = raw.find(b"\n", 0, MAX_HEADER_BYTES)
    if newline < 0:
        raise BadRequest("no header line in the first 64 KiB of the request")
    try:
        header = json_loads(raw[:newline].decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a JSON object")
    if header.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported protocol version {header.get('v')!r}")
    if header.get("language") not in SOURCE_FILES:
        raise BadRequest(f"language must be one of {sorted(SOURCE_FILES)}")
    source_len = header.get("source_len")
    if not isinstance(source_len, int) or source_len < 0:
        raise BadRequest("source_len must be an int >= 0")
    timeout_s = header.get("timeout_s")
    if not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise BadRequest("timeout_s must be a number > 0")
    output_bytes = header.get("output_bytes")
    if not isinstance(output_bytes, int) or output_bytes < 0:
        raise BadRequest("output_bytes must be an int >= 0")
    max_procs = header.get("max_procs")
    if max_procs is not None and (not isinstance(max_procs, int) or max_procs < 1):
        raise BadRequest("max_procs must be an int >= 1")
    body = raw[newline + 1 :]
    if len(body) < source_len:
        raise BadRequest(f"source truncated: {len(body)} of {source_len} bytes")
    try:
        source = body[:source_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"source is not UTF-8: {exc}") from None
    return header, source, body[source_len:]


# --------------------------------------------------------------------------- run


def run_program(program: Program, header: dict, source: str, stdin: bytes) -> dict:
    filename = SOURCE_FILES[header["language"]]
    os.chdir(WORKDIR)
    with open(filename, "w", encoding="utf-8") as f:
        f.write(source)

    limit = header["output_bytes"]
    out, err = Capture(program.stdout, limit), Capture(program.stderr, limit)
    feeder, reaper = Feeder(program.stdin, stdin), Reaper()
    for thread in (out, err, feeder, reaper):
        thread.start()

    before = oom_counters()
    raise_oom_score(program.pid)
    reaper.watch(program.pid)
    started = time.monotonic()
    program.go(header["language"], header.get("max_procs"))

    timed_out = not reaper.main_done.wait(header["timeout_s"])
    if timed_out:
        kill_everything()
        reaper.main_done.wait(DRAIN_TIMEOUT_S)
    wall_ms = int((time.monotonic() - started) * 1000)
    kill_everything()  # background leftovers would keep the pipes open
    for thread in (out, err, reaper):
        thread.join(DRAIN_TIMEOUT_S)

    return build_result(header, reaper.main_status, timed_out, before, out, err, wall_ms)


def build_result(
    header: dict,
    status: int | None,
    timed_out: bool,
    before: dict[str, int],
    out: Capture,
    err: Capture,
    wall_ms: int,
) -> dict:
    exit_code = signo = None
    if status is not None:
        if os.WIFEXITED(status):
            exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            signo = os.WTERMSIG(status)
    killed = signo == signal.SIGKILL and not timed_out
    evidence = judge_oom(before, oom_counters(), killed)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "v": PROTOCOL_VERSION,
        "nonce": header.get("nonce"),
        "ok": True,
        "exit_code": exit_code,
        "signal": signo,
        "timed_out": timed_out,
        "oom_killed": bool(evidence),
        "oom_evidence": evidence,
        "stdout_b64": b64(out.data),
        "stderr_b64": b64(err.data),
        "stdout_bytes": out.total,
        "stderr_bytes": err.total,
        "stdout_truncated": out.total > len(out.data),
        "stderr_truncated": err.total > len(err.data),
        "usage": {
            "utime_s": round(ru.ru_utime, 6),
            "stime_s": round(ru.ru_stime, 6),
            "maxrss_kb": ru.ru_maxrss,
            "wall_ms": wall_ms,
        },
    }


def b64(data: bytes | bytearray) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def emit(frame: dict) -> None:
    # The leading newline ends any partial line that reached our stdout before (gVisor lets
    # a same-uid program open /proc/1/fd/1 despite PR_SET_DUMPABLE); every program process
    # is dead by now, so nothing can follow the frame.
    line = b"\n" + json_dumps(frame).encode("ascii") + b"\n"
    view = memoryview(line)
    while view:
        view = view[os.write(1, view) :]


def main() -> int:
    if sys.argv[1:2] == [SECCOMP_FLAG]:  # the runc backend's containers (see the module doc)
        try:
            install_seccomp_filter(sys.argv[2])
        except (OSError, IndexError) as exc:
            os.write(2, f"runner: no seccomp filter, so nothing runs: {exc}\n".encode())
            return 3
    program = Program()  # forked before the request, a thread or the hardening
    harden_self()
    raw = sys.stdin.buffer.read()  # the whole request, until the host closes stdin
    try:
        header, source, stdin = parse_request(raw)
    except BadRequest as exc:
        program.cancel()
        emit({"v": PROTOCOL_VERSION, "nonce": None, "ok": False, "error": str(exc)})
        return 2  # nothing ran, so this refusal is the only line of output
    emit(run_program(program, header, source, stdin))
    return 0
