"""The action message and result contract (pydantic v2).

An action is an envelope (who, which action, when) plus a per-primitive payload; the
``primitive`` field discriminates. Unknown fields are rejected everywhere, and every
string, list, number and byte size has a bound, so a hostile or buggy agent cannot make a
worker allocate without limit.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from producer.errors import ErrorType, Status

__all__ = [
    "PRIMITIVES",
    "Action",
    "ActionResult",
    "ApiAction",
    "ApiAuth",
    "ApiPayload",
    "AuthProof",
    "BrowseAction",
    "BrowsePayload",
    "BrowseStep",
    "CodeAction",
    "CodeOutput",
    "CodePayload",
    "EmailAction",
    "EmailPayload",
    "ErrorInfo",
    "ExtractName",
    "ExtractSelector",
    "FilesAction",
    "FilesPayload",
    "Primitive",
    "WorkflowRef",
    "action_adapter",
    "action_json_schema",
    "queue_for",
    "task_name_for",
]

Primitive = Literal["browse", "code", "files", "email", "api"]
PRIMITIVES: tuple[Primitive, ...] = ("browse", "code", "files", "email", "api")

# Bounds. Generous for real work, small enough that one message cannot hurt a worker.
MAX_SOURCE_BYTES = 256 * 1024
MAX_STDIN_BYTES = 1024 * 1024
MAX_CONTENT_BYTES = 8 * 1024 * 1024  # files write content, base64 or text
MAX_TIMEOUT_S = 3_600  # absolute ceiling; tenant policy caps much lower
MAX_MEMORY_MB = 16_384
MAX_CPUS = 16.0

Ident = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$"),
]
ShortText = Annotated[str, StringConstraints(max_length=1_024)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=8_192)]
WorkspacePath = Annotated[str, StringConstraints(min_length=1, max_length=4_096)]
LabelKey = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
]
LabelValue = Annotated[str, StringConstraints(max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_CONTENT_BYTES)


# --------------------------------------------------------------------------- payloads


class CodePayload(_Strict):
    """Run a program in a fresh sandbox container."""

    language: Literal["python", "bash"]
    source: Annotated[str, StringConstraints(min_length=1)] = Field(
        description=f"program text, at most {MAX_SOURCE_BYTES} bytes (UTF-8)"
    )
    stdin: str = Field("", description=f"at most {MAX_STDIN_BYTES} bytes (UTF-8)")
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, description="wall clock; default and ceiling from policy"
    )
    memory_mb: int | None = Field(None, ge=16, le=MAX_MEMORY_MB, description="hard memory limit")
    cpus: float | None = Field(None, gt=0, le=MAX_CPUS, description="CPU share, e.g. 0.5")
    workspace: Literal["none", "ro", "rw"] = "none"

    @field_validator("source")
    @classmethod
    def _source_size(cls, v: str) -> str:
        size = len(v.encode())
        if size > MAX_SOURCE_BYTES:
            raise ValueError(f"source is {size} bytes; the limit is {MAX_SOURCE_BYTES}")
        return v

    @field_validator("stdin")
    @classmethod
    def _stdin_size(cls, v: str) -> str:
        size = len(v.encode())
        if size > MAX_STDIN_BYTES:
            raise ValueError(f"stdin is {size} bytes; the limit is {MAX_STDIN_BYTES}")
        return v


class FilesPayload(_Strict):
    """An operation on the tenant's workspace."""

    op: Literal["read", "write", "list", "stat", "delete", "mkdir", "move"]
    path: WorkspacePath
    content: str | None = Field(None, description=f"for write; at most {MAX_CONTENT_BYTES} bytes")
    encoding: Literal["utf-8", "base64"] = "utf-8"
    dest: WorkspacePath | None = Field(None, description="for move")

    @model_validator(mode="after")
    def _op_fields(self) -> FilesPayload:
        if self.op == "write" and self.content is None:
            raise ValueError("op 'write' needs 'content'")
        if self.op == "move" and self.dest is None:
            raise ValueError("op 'move' needs 'dest'")
        return self


class BrowseStep(_Strict):
    action: Literal[
        "goto", "click", "fill", "press", "select", "wait_for", "scroll", "hover", "check"
    ]
    selector: ShortText | None = None
    value: ShortText | None = None
    url: Url | None = None
    text: ShortText | None = None
    timeout_s: float | None = Field(None, gt=0, le=300)


ExtractName = Literal["text", "markdown", "links", "title", "html", "screenshot", "tables"]
_ATTR = r"^[A-Za-z_:][A-Za-z0-9_.:-]{0,63}$"


class ExtractSelector(_Strict):
    """A named selector: what to read from the elements it matches, under output.data."""

    name: Annotated[
        str, StringConstraints(max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
    ] = Field(description="key of the value under output.data, e.g. 'prices'")
    selector: Annotated[str, StringConstraints(min_length=1, max_length=1_024)] = Field(
        description="a Playwright selector: CSS ('.product .price'), 'text=Add to cart', "
        "'xpath=//h2', or chained ('.card >> text=Buy')"
    )
    attr: Annotated[str, StringConstraints(max_length=64, pattern=_ATTR)] = Field(
        "text",
        description="what to read: 'text' (the rendered text), 'html' (inner HTML), or an "
        "attribute name such as 'href' or 'src' (given as absolute URLs)",
    )
    all: bool = Field(
        False,
        description="true: every match, as a list (at most 1000); false: the first match, "
        "or null when nothing matches",
    )


def _extract_kind(value: Any) -> str:
    return "(selector)" if isinstance(value, dict | ExtractSelector) else "(name)"


# A name or a selector object; the tag picks the branch, so an error names one of them
# (tags in parentheses are dropped from field paths by producer.validation).
ExtractItem = Annotated[
    Annotated[ExtractName, Tag("(name)")] | Annotated[ExtractSelector, Tag("(selector)")],
    Discriminator(_extract_kind),
]


def _extract_any_of(schema: dict[str, Any]) -> None:
    # The two branches exclude each other (a string, an object), so anyOf says the same
    # as pydantic's oneOf and is what function-calling APIs support most widely.
    items = schema.get("properties", {}).get("extract", {}).get("items", {})
    if "oneOf" in items:
        items["anyOf"] = items.pop("oneOf")


class BrowsePayload(_Strict):
    model_config = ConfigDict(json_schema_extra=_extract_any_of)

    url: Url
    steps: list[BrowseStep] = Field(default_factory=list, max_length=100)
    extract: list[ExtractItem] = Field(
        default_factory=lambda: ["text"],
        max_length=32,
        description="what to return: 'text', 'markdown', 'links', 'title', 'html', "
        "'screenshot', 'tables' (every <table> as header + rows, under output.data.tables), "
        "and named selectors ({'name', 'selector', 'attr', 'all'}, under output.data.<name>)."
        " A PDF answers 'text' (and 'markdown') with its text",
    )
    timeout_s: float | None = Field(None, gt=0, le=600)
    viewport: dict[Literal["width", "height"], Annotated[int, Field(ge=64, le=8_192)]] | None = None
    user_agent: ShortText | None = None
    session: Ident | None = Field(None, description="name of a saved storage-state secret")

    @field_validator("extract")
    @classmethod
    def _selector_names(cls, v: list[str | ExtractSelector]) -> list[str | ExtractSelector]:
        seen: set[str] = set()
        for item in v:
            if not isinstance(item, ExtractSelector):
                continue
            if item.name == "tables":
                raise ValueError("selector name 'tables' is taken by the tables extract; rename it")
            if item.name in seen:
                raise ValueError(f"two selectors are named {item.name!r}; names must be unique")
            seen.add(item.name)
        return v


EmailAddress = Annotated[
    str, StringConstraints(min_length=3, max_length=320, pattern=r"^[^\s@<>,;\"]+@[^\s@<>,;\"]+$")
]


class EmailPayload(_Strict):
    to: list[EmailAddress] = Field(min_length=1, max_length=100)
    cc: list[EmailAddress] = Field(default_factory=list, max_length=100)
    bcc: list[EmailAddress] = Field(default_factory=list, max_length=100)
    subject: Annotated[str, StringConstraints(max_length=998)]
    text: Annotated[str, StringConstraints(max_length=1_048_576)] | None = None
    html: Annotated[str, StringConstraints(max_length=1_048_576)] | None = None
    attachments: list[WorkspacePath] = Field(default_factory=list, max_length=20)
    reply_to: EmailAddress | None = None
    dry_run: bool = False


class ApiAuth(_Strict):
    secret: Ident = Field(description="name of a secret in the worker's store, never the value")
    scheme: Literal["bearer", "basic", "header", "query"] = "bearer"
    name: ShortText | None = Field(None, description="header or query parameter name")


class ApiPayload(_Strict):
    method: Literal["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: Url
    headers: dict[ShortText, ShortText] = Field(default_factory=dict, max_length=64)
    query: dict[ShortText, ShortText] = Field(default_factory=dict, max_length=128)
    json_: Any = Field(None, alias="json")
    body: str | None = Field(None, max_length=MAX_CONTENT_BYTES)
    auth: ApiAuth | None = None
    timeout_s: float | None = Field(None, gt=0, le=300)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- envelope


class AuthProof(_Strict):
    """Who sent the action: added by ``ActionClient`` from its producer key
    (``producer.auth``), checked by the worker before anything runs. Agents never write it."""

    key_id: Annotated[str, StringConstraints(pattern=r"^k[0-9a-f]{16}$")]
    ts: int = Field(ge=0, le=2**53, description="signing time, ms since the epoch")
    nonce: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,64}$")]
    sig: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{86}$")]
    # A batch member (ProducerKey.sign_many): the signature covers a Merkle root, and
    # these lead from this action to it.
    index: int | None = Field(None, ge=0, lt=2**20, description="leaf position in the batch")
    path: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{0,854}$")] | None = Field(
        None, description="the sibling hashes from the leaf to the root, concatenated, base64url"
    )

    @model_validator(mode="after")
    def _batch_fields(self) -> AuthProof:
        if (self.index is None) != (self.path is None):
            raise ValueError("a batch proof has both index and path")
        return self


class WorkflowRef(_Strict):
    """Which workflow step an action is: set by the fleet's workflow engine, never by a
    producer. The worker accepts the step without a producer signature only against the
    engine's grant for exactly this message (docs/workflows.md)."""

    id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f-]{36}$")]
    step: Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
    phase: Literal["run", "compensate"] = "run"


class _Envelope(_Strict):
    tenant_id: Ident
    agent_id: Ident
    user_id: Ident | None = None
    action_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    deadline: AwareDatetime | None = None
    priority: int = Field(0, ge=0, le=9)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    on_limit: Literal["defer", "fail"] = Field(
        "defer",
        description="over a rate or concurrency limit: wait for a slot (defer) or end "
        "at once as rate_limited with the wait in error.details (fail)",
    )
    auth: AuthProof | None = Field(
        None, description="signature of a producer key; set by ActionClient, not by hand"
    )
    workflow: WorkflowRef | None = Field(
        None, description="set by the fleet on a workflow step's action, not by hand"
    )

    @field_validator("action_id")
    @classmethod
    def _uuid(cls, v: str) -> str:
        try:
            return str(uuid.UUID(v))
        except ValueError:
            raise ValueError("action_id must be a UUID, e.g. from uuid4()") from None

    @model_validator(mode="after")
    def _default_key(self) -> _Envelope:
        if self.idempotency_key is None:
            self.idempotency_key = self.action_id
        return self


class CodeAction(_Envelope):
    primitive: Literal["code"]
    payload: CodePayload


class FilesAction(_Envelope):
    primitive: Literal["files"]
    payload: FilesPayload


class BrowseAction(_Envelope):
    primitive: Literal["browse"]
    payload: BrowsePayload


class EmailAction(_Envelope):
    primitive: Literal["email"]
    payload: EmailPayload


class ApiAction(_Envelope):
    primitive: Literal["api"]
    payload: ApiPayload


Action = Annotated[
    CodeAction | FilesAction | BrowseAction | EmailAction | ApiAction,
    Field(discriminator="primitive"),
]
action_adapter: TypeAdapter[Action] = TypeAdapter(Action)


def action_json_schema() -> dict[str, Any]:
    schema = action_adapter.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ActionFleet action message"
    return schema


def queue_for(primitive: str) -> str:
    return f"actions.{primitive}"


def task_name_for(primitive: str) -> str:
    return f"actionfleet.{primitive}"


# --------------------------------------------------------------------------- results


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: ErrorType
    message: str
    retryable: bool
    details: dict[str, Any] = Field(default_factory=dict)


class CodeOutput(BaseModel):
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    usage: dict[str, Any]


class ActionResult(BaseModel):
    """What the agent gets back, and what ``actionfleet submit`` prints."""

    model_config = ConfigDict(extra="allow")

    action_id: str
    primitive: str
    status: Status
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    attempt: int = 1
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int = 0
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def final(self) -> bool:
        """False while a human's approval is awaited (``awaiting_approval``)."""
        return self.status != "awaiting_approval"
