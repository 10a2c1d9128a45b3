"""How many sandbox container lifecycles per second the Docker engine sustains, and where the
time and the CPU of one lifecycle go.

A lifecycle is what one code action costs the engine, with the exact create options of
``DockerSandbox`` (``_create``): create -> attach (stdin + stdout) -> start -> send a
``print(1)`` request -> read the runner's result frame from the attach stream -> remove.
``P`` threads run lifecycles back to back for each parallelism level; per level the script
prints lifecycles/s, the median wall time of each step, and the CPU-ms per lifecycle of the
whole machine (``/proc/stat``), dockerd and containerd (``/proc/<pid>/stat``) and this
client. The shims are re-parented to PID 1, so their CPU (and that of the runc calls and
container processes they reap) is invisible there: with ``--perf`` every CPU is sampled
with ``perf record -a`` and the CPU-ms per lifecycle are split by process group (dockerd,
containerd, shim, runc, the container's python3, other).

Variants (``--variant``, comma separated; each is measured in the same run):

- ``current``: what the pool did before this script: ``remove(force=True)`` right after the
  frame (the runner is usually still exiting, so the engine kills it: one more ``runc``).
- ``exited``: wait for the container's own exit, then remove.
- ``lognone``: as ``exited`` with the log driver ``none`` (the frame comes over attach).
- ``deferred``: as ``lognone``, but waiting for the exit and removal are off the lifecycle's
  thread: one background thread does them for used containers in order
  (``containers/prune`` cannot batch this: it also takes created, not yet started ones).
- ``autoremove``: as ``lognone`` with ``AutoRemove`` (the daemon removes on exit).

    .venv/bin/python benchmarks/engine_capacity.py [-n 40] [--parallel 1,2,4,8]
        [--variant current,exited,lognone,deferred,autoremove] [--rounds 1] [--perf]

Rounds interleave the variants (round 1: every variant and level, then round 2, ...), so
load from other users of a shared machine hits them alike; the table shows the median of
the rounds and the min-max spread.
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import CLK_TCK, ROOT, machine_busy_s  # noqa: F401  (ROOT: the project on sys.path)

BENCH_LABEL = "actionfleet.bench"
STEPS = ("create", "attach", "start", "frame", "remove")


@dataclass
class Level:
    variant: str
    parallel: int
    n: int
    seconds: float
    steps: dict[str, list[float]]
    cpu: dict[str, float]  # CPU-seconds over the level, by source
    perf: dict[str, float] = field(default_factory=dict)  # CPU-seconds by process group

    @property
    def rate(self) -> float:
        return self.n / self.seconds


# perf comm -> group. Container processes are python3 (the runner, the program); the
# benchmark and other users' Python show up as "python".
PERF_GROUPS = (
    ("dockerd", ("dockerd",)),
    ("shim", ("containerd-shim",)),
    ("containerd", ("containerd",)),
    ("runc", ("runc", "runc:", "exe")),
    ("container python3", ("python3",)),
)


def _perf_group(comm: str) -> str:
    for group, prefixes in PERF_GROUPS:
        if comm == group or any(comm.startswith(p) for p in prefixes):
            return group
    return "kernel threads" if comm.startswith(("kworker", "ksoftirqd", "rcu")) else "other"


def _pid_of(name: str) -> int | None:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def _proc_cpu(pid: int | None) -> float:
    """CPU-seconds of one process and its reaped children (``/proc/<pid>/stat``)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def _cpu_snapshot() -> dict[str, float]:
    own = os.times()
    return {
        "machine": machine_busy_s(),
        "dockerd": _proc_cpu(_pid_of("dockerd")),
        "containerd": _proc_cpu(_pid_of("containerd")),
        "client": own.user + own.system,
    }


@contextmanager
def _perf(enabled: bool) -> Iterator[dict[str, float]]:
    """While the block runs, ``perf record -a``; then CPU-seconds by process group."""
    groups: dict[str, float] = {}
    if not enabled or not shutil.which("perf"):
        yield groups
        return
    out = Path(tempfile.mkdtemp()) / "perf.data"
    proc = subprocess.Popen(
        ["perf", "record", "-a", "-F", "499", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.perf_counter()
    try:
        yield groups
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        cpu_seconds = (time.perf_counter() - started) * (os.cpu_count() or 1)
        report = subprocess.run(
            ["perf", "report", "-i", str(out), "--sort", "comm", "--stdio", "-q"],
            capture_output=True,
            text=True,
        ).stdout
        for line in report.splitlines():
            pct, _, comm = line.strip().partition("%")
            if comm.strip():
                group = _perf_group(comm.strip())
                groups[group] = groups.get(group, 0.0) + float(pct) / 100 * cpu_seconds
        shutil.rmtree(out.parent, ignore_errors=True)


class Engine:
    """Lifecycles with the sandbox's own create options, per variant."""

    def __init__(self) -> None:
        from sandboxes.base import Limits, RunSpec
        from sandboxes.docker import DockerSandbox, encode_request

        self.sandbox = DockerSandbox()
        self.limits = Limits(timeout_s=10, memory_mb=128, pids=64)
        self.spec = RunSpec(language="python", source="print(1)", limits=self.limits)
        self._encode: Callable[..., bytes] = encode_request
        self.run_id = secrets.token_hex(4)

    def create_kwargs(self, variant: str) -> dict[str, Any]:
        """The sandbox's own create arguments, changed only as ``variant`` says."""
        from docker.types import LogConfig

        api = self.sandbox._api
        captured: dict[str, Any] = {}
        # Capture what DockerSandbox._create would send, without creating anything.
        real = api.create_container
        api.create_container = lambda *a, **kw: captured.update(args=a, kw=kw) or {"Id": ""}  # type: ignore[method-assign]
        try:
            self.sandbox._create(self.spec, self._labels())
        finally:
            api.create_container = real  # type: ignore[method-assign]
        kw = captured["kw"]
        host_config = dict(kw["host_config"])
        if variant not in ("current", "exited"):
            host_config["LogConfig"] = LogConfig(type="none", config={})
        if variant == "autoremove":
            host_config["AutoRemove"] = True
        kw["host_config"] = host_config
        return {"image": captured["args"][0], **kw}

    def _labels(self) -> dict[str, str]:
        labels = self.sandbox._labels(self.spec)
        labels[BENCH_LABEL] = self.run_id  # cleanup() removes only this run's containers
        return labels

    def lifecycle(
        self, kwargs: dict[str, Any], variant: str, done: queue.Queue[str | None]
    ) -> dict[str, float]:
        from sandboxes.docker import close_stdin
        from sandboxes.frames import read_frame

        api, times = self.sandbox._api, {}
        t = time.perf_counter()
        kw = dict(kwargs, name=f"actionfleet-bench-{secrets.token_hex(6)}", labels=self._labels())
        cid = api.create_container(**kw)["Id"]
        times["create"], t = time.perf_counter() - t, time.perf_counter()
        try:
            wrapper, sock = self.sandbox._attach_stdin(cid, stdout=True)
            times["attach"], t = time.perf_counter() - t, time.perf_counter()
            try:
                api.start(cid)
                times["start"], t = time.perf_counter() - t, time.perf_counter()
                nonce = secrets.token_hex(16)
                self.sandbox._send(cid, sock, self._encode(self.spec, nonce))
                frame, _ = read_frame(sock, nonce, time.monotonic() + 30, self.limits)
                times["frame"], t = time.perf_counter() - t, time.perf_counter()
                assert frame is not None and frame["exit_code"] == 0, frame
            finally:
                close_stdin(wrapper, sock)
        finally:
            if variant in ("exited", "lognone"):
                api.wait(cid, timeout=30)
            if variant in ("current", "exited", "lognone"):
                self.sandbox._remove(cid)
                cid = ""
            elif variant == "deferred":
                done.put(cid)
        times["remove"] = time.perf_counter() - t if not cid else 0.0
        return times

    def remove_loop(self, done: queue.Queue[str | None]) -> None:
        """``deferred``: remove used containers, in order, off the lifecycles' threads."""
        while (cid := done.get()) is not None:
            self.sandbox._api.wait(cid, timeout=30)
            self.sandbox._remove(cid)

    def leftovers(self) -> list[str]:
        found = self.sandbox._api.containers(
            all=True, filters={"label": f"{BENCH_LABEL}={self.run_id}"}
        )
        return [c["Id"] for c in found]

    def cleanup(self) -> None:
        deadline = time.monotonic() + 60
        while (ids := self.leftovers()) and time.monotonic() < deadline:
            for cid in ids:
                self.sandbox._remove(cid)
            time.sleep(0.2)


def measure(engine: Engine, variant: str, parallel: int, n: int, perf: bool) -> Level:
    kwargs = engine.create_kwargs(variant)
    done: queue.Queue[str | None] = queue.Queue()
    remover = threading.Thread(target=engine.remove_loop, args=(done,), daemon=True)
    remover.start()
    # Untimed warm-up: HTTP connections opened, page cache warm.
    with ThreadPoolExecutor(parallel) as ex:
        list(ex.map(lambda _: engine.lifecycle(kwargs, variant, done), range(parallel)))
    before = _cpu_snapshot()
    with _perf(perf) as groups, ThreadPoolExecutor(parallel) as ex:
        started = time.perf_counter()
        samples = list(ex.map(lambda _: engine.lifecycle(kwargs, variant, done), range(n)))
        # Removal is part of the work: the level ends when this run has nothing left.
        while variant in ("deferred", "autoremove") and engine.leftovers():
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        after = _cpu_snapshot()  # before perf stops and reports (that costs CPU too)
    done.put(None)
    remover.join()
    engine.cleanup()
    return Level(
        variant,
        parallel,
        n,
        seconds,
        {s: [x[s] * 1000 for x in samples] for s in STEPS},
        {k: after[k] - before[k] for k in before},
        dict(groups),
    )


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else "-"


def report(levels: list[Level]) -> None:
    keys = list(dict.fromkeys((lv.variant, lv.parallel) for lv in levels))
    by_key = {k: [lv for lv in levels if (lv.variant, lv.parallel) == k] for k in keys}
    base_rate = statistics.median(lv.rate for lv in by_key[keys[0]])
    print(
        f"{'variant':<11} {'P':>2} {'n':>4} {'life/s':>7} {'spread':>9} {'x base':>6} "
        + " ".join(f"{s:>7}" for s in STEPS)
        + f" {'machine':>8} {'dockerd':>8} {'ctrd':>6} {'client':>6}"
    )
    for (variant, parallel), runs in by_key.items():
        rate = statistics.median(lv.rate for lv in runs)
        steps = {s: statistics.median(x for lv in runs for x in lv.steps[s]) for s in STEPS}
        n = sum(lv.n for lv in runs)
        cpu = {k: 1000 * sum(lv.cpu[k] for lv in runs) / n for k in runs[0].cpu}
        print(
            f"{variant:<11} {parallel:>2} {n:>4} {rate:>7.2f} "
            f"{_spread([lv.rate for lv in runs]):>9} {rate / base_rate:>6.2f} "
            + " ".join(f"{steps[s]:>7.1f}" for s in STEPS)
            + f" {cpu['machine']:>8.0f} {cpu['dockerd']:>8.1f} {cpu['containerd']:>6.1f}"
            f" {cpu['client']:>6.1f}"
        )
    print(
        f"(life/s: median of the rounds, spread min-max; ratios against {keys[0][0]} at "
        f"P={keys[0][1]}; steps: median ms; CPU columns: CPU-ms per lifecycle, machine = "
        "every CPU busy, including other users of a shared host)"
    )
    perf_keys = [k for k in keys if any(lv.perf for lv in by_key[k])]
    if perf_keys:
        groups = [g for g, _ in PERF_GROUPS] + ["kernel threads", "other"]
        print("perf record -a, CPU-ms per lifecycle by process group:")
        print(
            f"{'variant':<11} {'P':>2} "
            + " ".join(f"{g[:10]:>10}" for g in groups)
            + f" {'ours':>7}"
        )
        for k in perf_keys:
            runs = [lv for lv in by_key[k] if lv.perf]
            n = sum(lv.n for lv in runs)
            ms = {g: 1000 * sum(lv.perf.get(g, 0.0) for lv in runs) / n for g in groups}
            ours = sum(ms[g] for g, _ in PERF_GROUPS)
            print(
                f"{k[0]:<11} {k[1]:>2} "
                + " ".join(f"{ms[g]:>10.1f}" for g in groups)
                + f" {ours:>7.1f}"
            )
        print(
            "(ours = dockerd + containerd + shim + runc + container python3; other = "
            "everything else, e.g. this client, other users; 2 cores = 2000 CPU-ms/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40, help="lifecycles per level (40)")
    parser.add_argument("--parallel", default="1,2,4,8", help="parallelism levels (1,2,4,8)")
    parser.add_argument("--variant", default="current,exited,lognone,deferred,autoremove")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (1)")
    parser.add_argument("--perf", action="store_true", help="perf record -a every level")
    args = parser.parse_args()

    engine = Engine()
    levels = []
    try:
        for _ in range(args.rounds):
            for variant in args.variant.split(","):
                for parallel in (int(p) for p in args.parallel.split(",")):
                    levels.append(measure(engine, variant, parallel, args.n, args.perf))
    finally:
        engine.cleanup()
    report(levels)


if __name__ == "__main__":
    main()
