"""The ``code`` primitive: run python or bash in a fresh sandbox container."""

from __future__ import annotations

from typing import Any, ClassVar

from producer.errors import ActionTimeout, QuotaExceeded, ResourceExhausted, ValidationError_
from producer.models import Action, CodeAction
from sandboxes.base import RunOutcome, RunSpec, Sandbox
from workers.middleware import ActionContext
from workers.policy import Grant
from workers.workspace.tenant import Workspaces

__all__ = ["CodeExecutor"]


def _text(data: bytes) -> str:
    # Programs may print anything; a model needs text, so undecodable bytes are replaced.
    return data.decode("utf-8", errors="replace")


def _output(outcome: RunOutcome) -> dict[str, Any]:
    u = outcome.usage
    return {
        "exit_code": outcome.exit_code,
        "stdout": _text(outcome.stdout),
        "stderr": _text(outcome.stderr),
        "stdout_truncated": outcome.stdout_truncated,
        "stderr_truncated": outcome.stderr_truncated,
        "usage": {
            "wall_ms": u.wall_ms,
            "cpu_user_s": round(u.cpu_user_s, 4),
            "cpu_system_s": round(u.cpu_system_s, 4),
            "max_rss_kb": u.max_rss_kb,
            "runtime": outcome.runtime,
            "sandbox_id": outcome.sandbox_id,
        },
    }


class CodeExecutor:
    """A non-zero exit is still a succeeded action: the program ran and ``exit_code`` says
    how it ended. Timeouts and memory exhaustion are failures of the action itself."""

    primitive: ClassVar[str] = "code"

    def __init__(self, sandbox: Sandbox, workspaces: Workspaces | None = None) -> None:
        self.sandbox = sandbox
        self.workspaces = workspaces

    def execute(self, action: Action, grant: Grant, ctx: ActionContext) -> dict[str, Any]:
        assert isinstance(action, CodeAction) and grant.limits is not None
        p = action.payload
        workspace = None
        # grant.workspace is the payload's mode, already capped by the tenant's policy.
        if grant.workspace != "none":
            if self.workspaces is None:
                raise ValidationError_(
                    "this worker has no files workspace configured; send workspace 'none'",
                    field="payload.workspace",
                )
            if grant.workspace == "rw":
                self._check_workspace_quota(action.tenant_id, grant)
            workspace = (self.workspaces.tenant_dir(action.tenant_id), grant.workspace)
        spec = RunSpec(
            language=p.language,
            source=p.source,
            stdin=p.stdin.encode(),
            limits=grant.limits,
            labels={
                "action_id": action.action_id,
                "tenant_id": action.tenant_id,
                "attempt": str(ctx.attempt),
            },
            workspace=workspace,
        )
        outcome = self.sandbox.run(spec)
        ctx.sandbox_id = outcome.sandbox_id
        output = _output(outcome)
        limits = grant.limits
        if outcome.timed_out:
            raise ActionTimeout(
                f"the program ran longer than its {limits.timeout_s:g}s timeout and was "
                "killed; make it faster or ask for a longer timeout_s",
                output=output,
                retryable=False,
                timeout_s=limits.timeout_s,
            )
        if outcome.oom_killed:
            raise ResourceExhausted(
                f"the program exceeded its {limits.memory_mb} MB memory limit and was "
                "killed; use less memory or ask for a larger memory_mb",
                output=output,
                memory_mb=limits.memory_mb,
            )
        return output

    def _check_workspace_quota(self, tenant_id: str, grant: Grant) -> None:
        # Inside the container nothing bounds what the program writes to the bind mount
        # (see docs/files.md); at least a workspace already over quota is not handed out
        # read-write again.
        assert self.workspaces is not None
        limits = grant.tenant.files
        used, entries = self.workspaces.tenant(tenant_id).usage()
        if used > limits.max_total_bytes or entries > limits.max_files:
            raise QuotaExceeded(
                f"the workspace holds {used} bytes in {entries} files and directories, over "
                f"the tenant's limit ({limits.max_total_bytes} bytes, {limits.max_files} "
                "entries); delete files (files op 'delete') or use workspace 'ro'",
                field="payload.workspace",
                used=used,
                limit=limits.max_total_bytes,
            )

    def close(self) -> None:
        self.sandbox.close()
