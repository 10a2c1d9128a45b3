"""What one sandbox container lifecycle costs through the Docker engine, against the same
container run by ``runc`` directly: the OCI config the engine generates for a sandbox
(seccomp, capabilities, cgroup limits, namespaces, masked paths, tmpfs mounts, uid 10001),
the same image's files, the same runner and ``print(1)`` request, in the same run.

    sudo .venv/bin/python benchmarks/runtime_cost.py [-n 20] [--rounds 3]

engine: ``engine_capacity.py``'s lifecycle with the sandbox's own create options (create
-> attach -> start -> request -> frame -> wait -> remove). runc: ``runc run`` of a bundle
with the runc backend's config for the image (``sandboxes/runc_bundle.py``: a started
sandbox container's ``config.json`` without its engine-side prestart hook and
``/etc/hosts``-style bind mounts, the root a read-only copy of the image's files), the
request on stdin, the frame read from stdout. Both count every CPU
of the machine (``/proc/stat``), so the work the engine, containerd and the shims do per
container is in the first and not in the second. Rounds interleave the subjects. Needs
root and the ``runc`` the engine uses.

This is what the runc sandbox backend (``sandboxes/runc.py``: no dockerd, containerd or
shim on the path) saves per action, measured without the fleet around it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import machine_busy_s, pct
from engine_capacity import Engine

from sandboxes.runc import CGROUP_PARENT
from sandboxes.runc_bundle import prepare_template


def make_bundle(engine: Engine, where: Path) -> None:
    """A runc bundle for the sandbox in ``where``: the runc backend's template of the image
    (``sandboxes.runc_bundle``) with the benchmark's limits, and one cgroup that the
    sequential runs reuse (runc removes it at the end of each)."""
    template = prepare_template(engine.sandbox.image, where)
    config = template.config_for(engine.limits, f"/{CGROUP_PARENT}/runtime-cost", {})
    (where / "config.json").write_text(json.dumps(config))


def runc_lifecycle(bundle: Path, request: bytes, nonce: str) -> float:
    cid = f"af-bench-{secrets.token_hex(6)}"
    t = time.perf_counter()
    out = subprocess.run(
        ["runc", "run", "--bundle", str(bundle), cid], input=request, capture_output=True
    )
    wall = time.perf_counter() - t
    frame = next(
        (json.loads(line) for line in out.stdout.splitlines() if nonce.encode() in line), None
    )
    assert frame is not None and frame["exit_code"] == 0, (out.returncode, out.stderr[-500:])
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="lifecycles per subject and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("runc"):
        raise SystemExit("runtime_cost.py runs runc itself: run it as root, with runc on PATH")

    from sandboxes.docker import encode_request

    engine = Engine()
    nonce = secrets.token_hex(16)
    request = encode_request(engine.spec, nonce)
    done: queue.Queue[str | None] = queue.Queue()
    kwargs = engine.create_kwargs("exited")
    cpu: dict[str, list[float]] = {"engine": [], "runc": []}
    wall: dict[str, list[float]] = {"engine": [], "runc": []}
    with tempfile.TemporaryDirectory(prefix="af-runc-") as tmp:
        bundle = Path(tmp)
        make_bundle(engine, bundle)
        try:
            for _ in range(args.rounds):
                for subject in ("engine", "runc"):
                    busy = machine_busy_s()
                    for _ in range(args.n):
                        if subject == "engine":
                            t = time.perf_counter()
                            engine.lifecycle(kwargs, "exited", done)
                            wall[subject].append(time.perf_counter() - t)
                        else:
                            wall[subject].append(runc_lifecycle(bundle, request, nonce))
                    cpu[subject].append((machine_busy_s() - busy) * 1000 / args.n)
        finally:
            engine.cleanup()
    base = statistics.median(cpu["engine"])
    print(f"{'subject':<8} {'CPU-ms/lifecycle':>17} {'rounds':>18} {'p50 ms':>7} {'x engine':>9}")
    for subject in ("engine", "runc"):
        med = statistics.median(cpu[subject])
        print(
            f"{subject:<8} {med:>17.0f} {' '.join(f'{c:.0f}' for c in cpu[subject]):>18}"
            f" {pct([w * 1000 for w in wall[subject]], 0.5):>7.0f} {med / base:>9.2f}"
        )
    print(
        f"({args.n} lifecycles per subject and round, {args.rounds} rounds; CPU: every CPU"
        " of the machine, other users included; one lifecycle at a time)"
    )


if __name__ == "__main__":
    main()
