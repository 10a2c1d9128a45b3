"""The program's process in a sandbox container: forked from the runner at start, it must
run a python program as ``python3 -u main.py`` would (``sandboxes/image/_runner_program.py``)."""

from __future__ import annotations

import pytest

from sandboxes.docker import DockerSandbox
from tests.sandboxes import test_sandbox
from tests.sandboxes.test_sandbox import run

sandbox = test_sandbox.sandbox  # the fixture: each test under runc and gVisor

# A python program runs in an interpreter forked from the runner, set up as `python3 -u
# main.py` would be. Each probe is run that way and, from inside the same container, by a
# real `python3 -u main.py` (same directory, file and environment); both must agree.
FIDELITY_PROBES = {
    "state": (
        "import builtins, json, os, sys\n"
        "print(json.dumps({'argv': sys.argv, 'path': sys.path, 'file': __file__,\n"
        "    'name': __name__, 'main': sorted(k for k in vars(sys.modules['__main__'])\n"
        "        if not k.startswith('_')), 'env': dict(os.environ), 'cwd': os.getcwd(),\n"
        "    'exit': callable(getattr(builtins, 'exit', None)),\n"
        "    'nobyte': sys.dont_write_bytecode,\n"
        "    'streams': [(s.encoding, s.errors, s.line_buffering, s.write_through)\n"
        "        for s in (sys.stdin, sys.stdout, sys.stderr)],\n"
        "    'stdout_is_dunder': sys.stdout is sys.__stdout__,\n"
        "    'sid': os.getsid(0) == os.getpid(),\n"
        "    'annotations': str((lambda: None).__annotations__)}))\n"
        "sys.stdout.write('no newline, unbuffered')\n"
    ),
    "stdin": "import sys\nprint(repr(sys.stdin.read()))",
    "traceback": "def f():\n    raise ValueError('boom')\n\nf()\n",
    "syntax error": "print(\n",
    "sys.exit message": "import sys\nsys.exit('bye')",
    "exit builtin": "exit(3)",
    "shutdown": (
        "import atexit, threading, time\n"
        "f = open('/tmp/unclosed', 'w')\n"
        "f.write('flushed at shutdown')\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread joined'))).start()\n"
        "print('main done')\n"
    ),
    "keyboard interrupt": "raise KeyboardInterrupt",
}
REFERENCE_WRAPPER = (
    "import subprocess, sys\n"
    "with open('main.py', 'w') as f:\n"
    "    f.write({probe!r})\n"
    "ran = subprocess.run(['/usr/bin/python3', '-u', 'main.py'], input=b'stdin bytes',\n"
    "                     capture_output=True, start_new_session=True)\n"
    "sys.stdout.buffer.write(ran.stdout)\n"
    "sys.stderr.buffer.write(ran.stderr)\n"
    "sys.exit(ran.returncode if ran.returncode >= 0 else 200 - ran.returncode)\n"
)
SHUTDOWN_CHECK = "print(open('/tmp/unclosed').read())"


@pytest.mark.parametrize("probe", sorted(FIDELITY_PROBES))
def test_python_program_runs_as_python3_u_main_py(sandbox: DockerSandbox, probe: str) -> None:
    source = FIDELITY_PROBES[probe]
    if probe == "shutdown":  # the file written at shutdown is read back in the same container
        source += f"import atexit\natexit.register(lambda: exec({SHUTDOWN_CHECK!r}))\n"
    forked = run(sandbox, source, stdin=b"stdin bytes")
    reference = run(sandbox, REFERENCE_WRAPPER.format(probe=source), stdin=b"")
    # The reference reports death by a signal as 200 + signo (the forked one as no exit code).
    ref_code = reference.exit_code
    expected_code = None if ref_code is not None and ref_code > 200 else ref_code
    assert (forked.exit_code, forked.stdout, forked.stderr) == (
        expected_code,
        reference.stdout,
        reference.stderr,
    ), probe
    if probe == "keyboard interrupt":
        assert ref_code == 200 + 2  # SIGINT, as CPython ends on an unhandled one


def test_python_program_cannot_find_the_nonce(sandbox: DockerSandbox) -> None:
    # The program's process was forked before the request arrived: no copy of the request
    # (or its nonce) is anywhere in its memory.
    outcome = run(
        sandbox,
        "import gc, sys\n"
        "hits = [o for o in gc.get_objects() if isinstance(o, dict) and 'nonce' in o]\n"
        "frames = [f.f_code.co_name for f in sys._current_frames().values()]\n"
        "print(len(hits), frames)",
    )
    assert outcome.exit_code == 0, outcome
    assert outcome.stdout.startswith(b"0 ['<module>'"), outcome.stdout
