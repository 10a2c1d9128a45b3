"""The sandbox interface: what a backend is given and what it returns.

A backend runs one program in a fresh, isolated environment that no other action has
used, enforces the limits, and always cleans up. Infrastructure failures (engine down,
image missing, container failed to start) raise ``producer.errors.SandboxError``;
everything the program itself does (non-zero exit, timeout, OOM) is reported in
``RunOutcome``, not raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Language = Literal["python", "bash"]
Runtime = Literal["runc", "runsc"]
WorkspaceMode = Literal["ro", "rw"]
# The user every sandboxed program runs as; the files primitive gives workspace files to it.
SANDBOX_UID = 10001
WORKSPACE_MOUNT = "/workspace"


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits for one run. Already capped by policy when they reach a backend."""

    timeout_s: float = 30.0
    memory_mb: int = 256
    cpus: float = 1.0
    pids: int = 128
    output_bytes: int = 1 << 20  # per stream; the rest is counted and dropped
    tmpfs_mb: int = 64  # size of each writable tmpfs (/tmp and /work)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One program to run."""

    language: Language
    source: str
    stdin: bytes = b""
    limits: Limits = field(default_factory=Limits)
    network: bool = False  # True only where policy allows; default none
    labels: dict[str, str] = field(default_factory=dict)  # e.g. action_id, tenant_id
    # A host directory (the tenant's files workspace) bind-mounted at /workspace, read-only
    # or read-write; None: no mount. The backend keeps every other hardening as is.
    workspace: tuple[Path, WorkspaceMode] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    max_rss_kb: int = 0
    wall_ms: int = 0


@dataclass(frozen=True, slots=True)
class RunOutcome:
    exit_code: int | None  # None when the program never reported one (killed)
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    oom_killed: bool
    usage: Usage
    sandbox_id: str  # container id (short) for audit and debugging
    runtime: Runtime


class Sandbox(Protocol):
    """A sandbox backend. One instance is shared by a worker process; ``run`` is thread-safe."""

    runtime: Runtime

    def run(self, spec: RunSpec) -> RunOutcome: ...

    def reap(self) -> int:
        """Remove leftovers (e.g. from a dead worker). Returns how many were removed."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Warm:
    """A started sandbox whose runner waits for its one request (``WarmBackend``)."""

    id: str  # container id
    expires: float  # the container's expiry label (wall clock)
    created: float  # wall clock
    handle: Any  # the backend's connection to the runner (attach socket, pipes)


class WarmBackend(Sandbox, Protocol):
    """A backend the warm pool (``sandboxes.pool``) can pre-start sandboxes with.

    ``start_warm`` makes a sandbox of ``limits`` (timeout and output caps aside: they travel
    in the request) carrying ``labels``, started and waiting; ``run_warm`` runs one spec in
    it, exactly as ``run`` would decide the outcome, and leaves the ending to ``retire``,
    which the pool calls once per warm sandbox, used or not, off the caller's path.
    Failures to start raise ``producer.errors.SandboxError``.
    """

    image: str
    kill_grace_s: float

    def start_warm(self, limits: Limits, labels: dict[str, str]) -> Warm: ...

    def run_warm(self, warm: Warm, spec: RunSpec) -> RunOutcome: ...

    def retire(self, warm: Warm) -> None: ...

    def warm_alive(self, warm: Warm) -> bool:
        """False once the sandbox died or its connection closed (never hand it out)."""
        ...
