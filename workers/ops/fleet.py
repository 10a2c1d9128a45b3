"""A local fleet: ``actionfleet up`` / ``status`` / ``down``.

``up`` supervises, in the foreground: a redis-server on a free loopback port (unless a
broker is configured) and one Celery worker per primitive queue that has an executor. A
worker that dies is restarted. When everything answers, ``$ACTIONFLEET_HOME/fleet.json``
records where the fleet is, so other commands find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.errors import FleetUnavailable
from producer.models import queue_for
from producer.procs import pid_alive
from producer.transport import redis_queue_keys
from producer.workflows import WORKFLOW_QUEUE
from workers.config import Settings

__all__ = [
    "Fleet",
    "celery_worker_argv",
    "fleet_status",
    "free_port",
    "queue_depths",
    "read_fleet_file",
    "redis_argv",
    "stop_fleet",
]

Say = Callable[[str], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_argv(
    exe: str,
    port: int,
    directory: Path | None = None,
    *,
    appendonly: bool = False,
    aclfile: Path | None = None,
) -> list[str]:
    """A redis-server on loopback only, no RDB snapshots; AOF only when asked for; its
    users from ``aclfile`` when given."""
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if directory is not None:
        argv += ["--dir", str(directory)]
    if aclfile is not None:
        argv += ["--aclfile", str(aclfile)]
    return [*argv, "--appendonly", "yes" if appendonly else "no"]


def celery_worker_argv(
    queues: str,
    *,
    app: str = "workers.app",
    name: str | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    quiet: bool = True,
    pool: str | None = None,
) -> list[str]:
    """``python -m celery -A app worker``; ``quiet`` skips mingle/gossip, which a fleet of
    single-queue workers does not use and which slows start-up."""
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues]
    if name:
        argv += ["-n", name]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if pool:
        argv += ["--pool", pool]
    argv += ["--loglevel", loglevel]
    if quiet:
        argv += ["--without-mingle", "--without-gossip"]
    return argv


def write_private(path: Path, text: str) -> None:
    """Write ``path`` atomically, readable and writable by its owner only (0600)."""
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def read_fleet_file(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(settings.fleet_file().read_text())
    except (OSError, ValueError):
        return None


def queue_depths(redis_client: Any, primitives: list[str]) -> dict[str, int]:
    """Messages waiting per queue, summed over kombu's per-priority lists."""
    depths: dict[str, int] = {}
    for p in primitives:
        q = queue_for(p)
        keys = redis_queue_keys(q)
        with redis_client.pipeline() as pipe:
            for key in keys:
                pipe.llen(key)
            depths[q] = sum(pipe.execute())
    return depths


def fleet_status(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    """What answers right now. Raises ``FleetUnavailable`` when no broker answers."""
    import redis
    from celery import Celery

    from producer.models import PRIMITIVES
    from producer.transport import celery_conf

    url = settings.resolved_broker_url()
    if not url:
        raise FleetUnavailable(f"no fleet: {settings.fleet_file()} not found and no broker set")
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
        depths = queue_depths(client, list(PRIMITIVES))
    except redis.RedisError as exc:
        raise FleetUnavailable(f"broker does not answer: {exc}") from exc
    finally:
        client.close()
    app = Celery("actionfleet-status", set_as_current=False)
    app.conf.update(celery_conf(settings, url))
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    finally:
        app.close()
    workers = {name: sorted(q["name"] for q in queues) for name, queues in sorted(replies.items())}
    return {
        "broker": "ok",
        "workers": workers,
        "queues": depths,
        "fleet": _shown(read_fleet_file(settings)),
    }


def _shown(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """fleet.json as ``status`` prints it: no key, no password."""
    if info is None:
        return None
    from kombu.utils.url import maybe_sanitize_url

    shown = {k: v for k, v in info.items() if k != "operator_key"}
    for name in ("broker_url", "admin_url"):
        if isinstance(shown.get(name), str):
            shown[name] = maybe_sanitize_url(shown[name])
    return shown


def stop_fleet(settings: Settings, timeout: float = 60.0) -> bool:
    """SIGTERM the ``up`` process of this home and wait for it. False if none ran."""
    info = read_fleet_file(settings)
    if not info or not pid_alive(int(info["pid"])):
        with contextlib.suppress(OSError):
            settings.fleet_file().unlink()
        return False
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


@dataclass
class _Child:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # our Ctrl-C must not hit children before we drain
            )


@dataclass
class Fleet:
    settings: Settings
    primitives: list[str]
    concurrency: int = 2
    say: Say = print
    children: list[_Child] = field(default_factory=list)
    redis: _Child | None = None
    ingester: _Child | None = None
    broker_url: str = ""
    flower: bool = False  # `up --flower`
    flower_child: _Child | None = None
    metrics: Any = None  # workers.ops.metrics.MetricsServer
    operator_key_id: str | None = None
    worker_url: str | None = None  # the workers' Redis user, when `up` made the users
    _stopping: bool = False

    # -- start ------------------------------------------------------------------------

    def _start_redis(self) -> str:
        exe = shutil.which("redis-server")
        if not exe:
            raise FleetUnavailable("redis-server is not installed; run scripts/setup.sh")
        port = free_port()
        data = self.settings.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        url = f"redis://127.0.0.1:{port}/0"
        aclfile = None
        if self.settings.auth == "required":
            # Users of their own for the operator, the workers and each producer key:
            # the default user is off (workers/auth/acl.py).
            from workers.ops.fleet_auth import redis_users

            users = redis_users(data, url, write_private)
            aclfile, url, self.worker_url = users.aclfile, users.admin_url, users.worker_url
        self.redis = _Child(
            "redis",
            redis_argv(exe, port, data.resolve(), aclfile=aclfile),
            self.settings.home / "logs" / "redis.log",
            dict(os.environ),
        )
        self.redis.start()
        self._wait(lambda: self._redis_ping(url), 15, "redis-server to answer")
        return url

    @staticmethod
    def _redis_ping(url: str) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["ACTIONFLEET_BROKER_URL"] = self.worker_url or self.broker_url
        env["ACTIONFLEET_HOME"] = str(self.settings.home.resolve())
        return env

    def _ingester(self) -> _Child:
        """The audit ingester: the only process that opens the (embedded) audit store."""
        argv = [sys.executable, "-m", "audit.cli", "audit", "ingest"]
        log = self.settings.home / "logs" / "audit-ingester.log"
        return _Child("audit-ingester", argv, log, self._child_env())

    def _worker(self, primitive: str) -> _Child:
        env = self._child_env()
        if self.flower:
            # Flower enables task events by broadcast only every 5 s: from the start, so an
            # action sent right after `up --flower` is on the dashboard too.
            env.setdefault("ACTIONFLEET_TASK_EVENTS", "true")
        name = f"{primitive}.{os.getpid()}@{socket.gethostname()}"
        queues = queue_for(primitive)
        if primitive == "files":  # workflow engine tasks are short Redis work, like files
            queues += f",{WORKFLOW_QUEUE}"
        argv = celery_worker_argv(queues, name=name, concurrency=self.concurrency)
        return _Child(name, argv, self.settings.home / "logs" / f"worker-{primitive}.log", env)

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._stopping:
                raise KeyboardInterrupt
            if ready():
                return
            time.sleep(0.2)
        raise FleetUnavailable(f"timed out after {timeout:.0f}s waiting for {what}")

    def _workers_ready(self) -> bool:
        try:
            status = fleet_status(self._settings_with_broker(), timeout=1.0)
        except FleetUnavailable:
            return False
        return all(c.name in status["workers"] for c in self.children)

    def _settings_with_broker(self) -> Settings:
        return self.settings.model_copy(update={"broker_url": self.broker_url})

    def start(self) -> None:
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True)
        running = read_fleet_file(self.settings)
        if running and pid_alive(int(running["pid"])) and int(running["pid"]) != os.getpid():
            raise FleetUnavailable(
                f"a fleet already runs from {home} (pid {running['pid']}); "
                "use `actionfleet down` first or another ACTIONFLEET_HOME"
            )
        self.broker_url = self.settings.broker_url or self._start_redis()
        from kombu.utils.url import maybe_sanitize_url

        self.say(f"broker: {maybe_sanitize_url(self.broker_url)}")  # never a password
        operator = self._operator_key()
        self.ingester = self._ingester()
        self.ingester.start()
        self.say(f"audit ingester started (log {self.ingester.log})")
        for p in self.primitives:
            child = self._worker(p)
            child.start()
            self.children.append(child)
            self.say(f"worker {child.name} started (queue {queue_for(p)}, log {child.log})")
        self._wait(self._workers_ready, 90, "workers to answer a ping")
        ops = self._start_ops()
        info = {
            "pid": os.getpid(),
            "broker_url": self.broker_url,
            "home": str(home.resolve()),
            "started_at": time.time(),
            "primitives": self.primitives,
            "workers": [
                {"name": c.name, "pid": c.proc.pid if c.proc else None} for c in self.children
            ],
            **ops,
            **operator,
        }
        write_private(self.settings.fleet_file(), json.dumps(info, indent=2))
        self.say(f"fleet ready: {self.settings.fleet_file()}")

    def _operator_key(self) -> dict[str, Any]:
        """fleet.json's auth fields (with auth required: an operator key, fleet_auth)."""
        if self.settings.auth != "required":
            self.say(
                "warning: ACTIONFLEET_AUTH=off: actions are not authenticated; anyone who can "
                "reach the broker may act as any tenant (single-user machines only)"
            )
            return {"auth": "off"}
        from workers.ops.fleet_auth import make_operator_key

        url = self.settings.limits_redis_url or self.broker_url
        self.operator_key_id, info = make_operator_key(url, self.worker_url is not None)
        self.say(f"auth: required; operator key {self.operator_key_id} in fleet.json (owner only)")
        return info

    def _start_ops(self) -> dict[str, Any]:
        """The metrics endpoint (always) and Flower (``--flower``); their URLs for fleet.json."""
        from workers.ops.flower import flower_argv, flower_auth, flower_env
        from workers.ops.metrics import start_metrics_server

        s = self.settings
        self.metrics = start_metrics_server(
            self.broker_url, host=s.metrics_host, port=s.metrics_port, audit_stream=s.audit_stream
        )
        self.say(f"metrics: {self.metrics.url}")
        ops: dict[str, Any] = {"metrics": {"url": self.metrics.url, "port": self.metrics.port}}
        if self.flower:
            auth, port = flower_auth(s), s.flower_port or free_port()
            env = flower_env(self._child_env(), auth)
            argv = flower_argv(self.broker_url, s.flower_host, port)
            log = s.home / "logs" / "flower.log"
            self.flower_child = _Child("flower", argv, log, env)
            self.flower_child.start()
            url = f"http://{s.flower_host}:{port}/"
            shown = auth.password if auth.generated else "(ACTIONFLEET_FLOWER_PASSWORD)"
            self.say(f"flower: {url} user {auth.user!r} password {shown}")
            ops["flower"] = {"url": url, "port": port, "user": auth.user}
        return ops

    # -- supervise / stop -------------------------------------------------------------

    def supervise(self) -> None:
        """Block until SIGINT/SIGTERM; restart a worker that died meanwhile."""
        while not self._stopping:
            extra = [c for c in (self.ingester, self.flower_child) if c is not None]
            for child in [*self.children, *extra]:
                if child.proc is not None and child.proc.poll() is not None:
                    child.restarts += 1
                    self.say(f"worker {child.name} exited ({child.proc.returncode}); restarting")
                    child.start()
            time.sleep(0.5)

    def request_stop(self, *_: Any) -> None:
        self._stopping = True

    def stop(self, grace_s: float = 60.0) -> None:
        # Warm shutdown: Celery finishes running actions, unstarted ones stay queued.
        for child in self.children:
            if child.proc and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        self._stop_ingester()
        if self.flower_child and self.flower_child.proc and self.flower_child.proc.poll() is None:
            self.flower_child.proc.terminate()
            try:
                self.flower_child.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.flower_child.proc.kill()
        if self.metrics is not None:
            self.metrics.stop()
        self._revoke_operator_key()
        if self.redis and self.redis.proc and self.redis.proc.poll() is None:
            self.redis.proc.terminate()
            try:
                self.redis.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.redis.proc.kill()
        info = read_fleet_file(self.settings)
        if info and int(info.get("pid", -1)) == os.getpid():
            with contextlib.suppress(OSError):
                self.settings.fleet_file().unlink()
        self.say("fleet stopped")

    def _revoke_operator_key(self) -> None:
        if self.operator_key_id is None or not self.broker_url:
            return
        from workers.ops.fleet_auth import revoke_operator_key

        url = self.settings.limits_redis_url or self.broker_url
        failed = revoke_operator_key(url, self.operator_key_id)
        if failed:
            self.say(f"warning: could not revoke operator key {self.operator_key_id}: {failed}")

    def _stop_ingester(self) -> None:
        ingester = self.ingester
        if not ingester or not ingester.proc or ingester.proc.poll() is not None:
            return
        # The fleet's own Redis keeps nothing on disk: let the ingester drain it first.
        if self.broker_url and self.redis is not None:
            from audit.reports import wait_until_ingested

            if not wait_until_ingested(self.broker_url, self.settings.audit_stream, 30):
                self.say("warning: audit events still in the stream after 30 s")
        ingester.proc.send_signal(signal.SIGTERM)
        try:
            ingester.proc.wait(30)
        except subprocess.TimeoutExpired:
            ingester.proc.kill()
            ingester.proc.wait()

    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.start()
            self.supervise()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
