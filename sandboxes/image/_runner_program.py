"""The program's process: forked from the runner when the container starts, it waits for
the word to go, then runs the program (see ``Program``)."""

# Only C modules are imported (as in _runner_main.py, whose start-up cost this is part of).
from __future__ import annotations

import _signal as signal
import os
import resource
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORKDIR = "/work"
SOURCE_FILES = {"python": "main.py", "bash": "main.sh"}
BASH_ARGV = ["/bin/bash", "main.sh"]
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
        run_python(WORKDIR + "/" + SOURCE_FILES["python"])
    argv = BASH_ARGV
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
    sys.path.remove(HERE)  # the runner's modules are not on the program's path
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
