"""ActionFleet sandbox runner: PID 1 of every sandbox container (Python 3.11, stdlib only).

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

Exit status of the runner: 0 after a frame with ok=true, 2 after ok=false.

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
import _thread
import binascii
import os
import resource
import sys
import time

try:  # the C half of json; the pure-Python module is the fallback on other interpreters
    from _json import encode_basestring_ascii, make_encoder, make_scanner
except ImportError:  # pragma: no cover
    make_scanner = None

PROTOCOL_VERSION = 1
WORKDIR = "/work"
MAX_HEADER_BYTES = 64 * 1024
CHUNK = 64 * 1024
# After the program exits or is killed, how long to wait for pipes to drain and for the last
# processes to be reaped. Everything was SIGKILLed, so this only bounds a misbehaving kernel.
DRAIN_TIMEOUT_S = 2.0

COMMANDS = {
    "python": ("main.py", ["/usr/bin/python3", "-u", "main.py"]),
    "bash": ("main.sh", ["/bin/bash", "main.sh"]),
}
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}
# Python ignores SIGPIPE (and may ignore others); ignored dispositions survive exec, so reset
# them for the program, as subprocess does with restore_signals=True.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# cgroup files that count OOM kills: v1 memory.oom_control ("oom_kill N", kernel >= 4.13)
# and v2 memory.events ("oom_kill N"); memory.failcnt counts hits of the v1 limit.
OOM_COUNTER_FILES = (
    "/sys/fs/cgroup/memory/memory.oom_control",
    "/sys/fs/cgroup/memory.events",
)
FAILCNT_FILE = "/sys/fs/cgroup/memory/memory.failcnt"


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
    if make_scanner is None:  # pragma: no cover
        import json

        return json.loads(text)
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
    if make_scanner is None:  # pragma: no cover
        import json

        return json.dumps(value, separators=(",", ":"))
    return "".join(_ENCODE(value, 0))


if make_scanner is not None:
    _SCAN = make_scanner(_JSONSettings())
    # (markers, default, encoder, indent, key_separator, item_separator, sort_keys,
    # skipkeys, allow_nan): no circular check, the frame is a tree we build.
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
    if header.get("language") not in COMMANDS:
        raise BadRequest(f"language must be one of {sorted(COMMANDS)}")
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


# --------------------------------------------------------------------------- threads


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

    def is_set(self) -> bool:
        return self._set

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


# --------------------------------------------------------------------------- helpers


def prctl(option: int, arg: int) -> int:
    """prctl(2), called through ``_ctypes`` (the ctypes package adds ~3 CPU-ms of imports
    to every start); these few lines are what ``ctypes.CDLL(None).prctl`` sets up."""
    import _ctypes

    class CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL
        _restype_ = CInt

    class Libc:
        _handle = _ctypes.dlopen(None)

    return Function(("prctl", Libc()))(option, arg, 0, 0, 0)


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


# --------------------------------------------------------------------------- run


class Program:
    """The program's process, forked from the runner when the container starts, before the
    request exists (so it never holds the nonce) and before any thread.

    It waits on a private pipe for the word to go. A python program then runs in this
    already started interpreter, as ``python3 -u main.py`` would run it (``run_python``),
    which spares a second interpreter start per action (~8 of the container's CPU-ms, and
    as much latency); a bash program is exec'd. Its stdin, stdout and stderr are pipes
    made here, whose other ends the runner keeps.
    """

    def __init__(self) -> None:
        in_r, self.stdin = os.pipe()
        self.stdout, out_w = os.pipe()
        self.stderr, err_w = os.pipe()
        go_r, self._go = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # never returns: runs the program, or exits
            for fd in (self.stdin, self.stdout, self.stderr, self._go):
                os.close(fd)
            program_main(go_r, (in_r, out_w, err_w))
        for fd in (in_r, out_w, err_w, go_r):
            os.close(fd)  # the program holds its own copies

    def go(self, language: str, max_procs: int | None) -> None:
        """Start the program (its source is in place); a program that died meanwhile is
        seen by the reaper."""
        try:  # noqa: SIM105 (contextlib is not imported, see above)
            os.write(self._go, f"{language} {max_procs or 0}".encode("ascii"))
        except OSError:
            pass
        os.close(self._go)

    def cancel(self) -> None:
        """No program will run (bad request): EOF makes the waiting process exit."""
        os.close(self._go)


def program_main(go_r: int, stdio: tuple[int, int, int]) -> None:
    """In the forked program process: take the pipes as stdio, wait, then run."""
    os.setsid()
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)  # also drops our copies of the request and frame streams
        os.close(fd)
    word = b""
    while chunk := os.read(go_r, 64):
        word += chunk
    os.close(go_r)
    if not word:
        os._exit(0)  # no request to run: the runner is gone or refused it
    language, max_procs = word.decode("ascii").split()
    if int(max_procs):
        resource.setrlimit(resource.RLIMIT_NPROC, (int(max_procs), int(max_procs)))
    os.chdir(WORKDIR)
    if language == "python":
        run_python(WORKDIR + "/" + COMMANDS["python"][0])
    argv = COMMANDS[language][1]
    for sig in RESET_SIGNALS:  # ignored dispositions survive exec
        signal.signal(sig, signal.SIG_DFL)
    os.execve(argv[0], argv, CHILD_ENV)


def run_python(path: str) -> None:
    """Run the program as ``python3 -u main.py`` in /work would (argv, path, site, env,
    unbuffered stdio, ``__main__``, tracebacks, exit status), then leave by ``SystemExit``
    through the runner's frames (none of which has a handler), so the interpreter shuts
    down as after any script: non-daemon threads joined, atexit run, files flushed."""
    import io

    sys.argv = [os.path.basename(path)]
    sys.path.insert(0, os.path.dirname(path))
    sys.dont_write_bytecode = True  # PYTHONDONTWRITEBYTECODE=1, which -I ignored
    os.environ.clear()
    os.environ.update(CHILD_ENV)
    for fd, name, old in (
        (0, "stdin", sys.__stdin__),
        (1, "stdout", sys.__stdout__),
        (2, "stderr", sys.__stderr__),
    ):
        # As the interpreter makes them with -u: unbuffered writers, same codec and errors.
        binary = open(fd, "rb" if fd == 0 else "wb", -1 if fd == 0 else 0, closefd=False)  # noqa: SIM115
        stream = io.TextIOWrapper(
            binary, old.encoding, old.errors, newline="\n", write_through=True
        )
        stream.mode = "r" if fd == 0 else "w"
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    import site

    site.main()  # what -S skipped: site-packages and builtins such as exit()
    main = type(sys)("__main__")
    main.__file__ = path
    main.__cached__ = None
    main.__builtins__ = sys.modules["builtins"]
    sys.modules["__main__"] = main
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        exc = exc.with_traceback(None)  # reported as the interpreter does: no trace
        sys.excepthook(type(exc), exc, None)
        raise SystemExit(1) from None
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # as the interpreter's top level does
        # The program's frames only: the first one of the traceback is this function's.
        exc = exc.with_traceback(exc.__traceback__.tb_next if exc.__traceback__ else None)
        sys.excepthook(type(exc), exc, exc.__traceback__)
        if isinstance(exc, KeyboardInterrupt):  # the interpreter exits by SIGINT then
            sys.stdout.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(1) from None
    raise SystemExit(0)


def run_program(program: Program, header: dict, source: str, stdin: bytes) -> dict:
    filename, _ = COMMANDS[header["language"]]
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
    program = Program()  # first: forked before the request, a thread or the hardening
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


if __name__ == "__main__":
    sys.exit(main())
