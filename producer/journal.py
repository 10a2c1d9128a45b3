"""The batch journal: what makes ``actionfleet batch --resume`` possible.

The journal sits next to the output (``OUT.jsonl.journal``) and is append-only JSON lines
(docs/batch.md has the format):

- a header: ``{"journal": "actionfleet-batch", "version": 1, "batch_id", "input",
  "input_sha256", "input_lines", "created_at"}``;
- write-ahead marks, before any line past the last mark is sent: ``{"sending": N}`` (no
  line above N was sent);
- checkpoints, after the output was flushed and fsynced: ``{"results": R, "out_bytes": B,
  "next_line": L}`` (the output's first B bytes hold the results of every input line
  before L, R of them);
- a last record when the batch ended: ``{"finished": true, "summary": {...}}``.

Every record is fsynced before the step it guards, so the journal survives SIGKILL and a
machine restart. A torn last line (a crash mid-write) is ignored on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

__all__ = ["JOURNAL_SUFFIX", "Checkpoint", "Journal", "JournalState", "scan_input"]

JOURNAL_SUFFIX = ".journal"
_KIND = "actionfleet-batch"
_VERSION = 1


def scan_input(path: Path) -> tuple[str, int]:
    """SHA-256 and the number of non-blank lines of ``path``, read in chunks (bounded
    memory whatever its size)."""
    digest, count = hashlib.sha256(), 0
    with path.open("rb") as fh:
        for line in fh:
            digest.update(line)
            count += bool(line.strip())
    return digest.hexdigest(), count


@dataclass(frozen=True, slots=True)
class Checkpoint:
    results: int = 0
    out_bytes: int = 0
    next_line: int = 1


@dataclass(slots=True)
class JournalState:
    """A journal as loaded: its header and where the batch stood."""

    header: dict[str, Any]
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    sending: int = 0  # no input line above this was sent
    finished: bool = False
    summary: dict[str, Any] | None = None

    @property
    def batch_id(self) -> str:
        return str(self.header["batch_id"])


def _sync(fh: IO[str]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


class Journal:
    """An open journal, appended to and fsynced record by record."""

    def __init__(self, path: Path, state: JournalState) -> None:
        self.path = path
        self.state = state
        self._fh = path.open("a", encoding="utf-8")

    @staticmethod
    def path_for(out: Path) -> Path:
        return out.with_name(out.name + JOURNAL_SUFFIX)

    @classmethod
    def create(
        cls, path: Path, *, batch_id: str, input_path: Path, input_sha256: str, input_lines: int
    ) -> Journal:
        header = {
            "journal": _KIND,
            "version": _VERSION,
            "batch_id": batch_id,
            "input": str(input_path.resolve()),
            "input_sha256": input_sha256,
            "input_lines": input_lines,
            "created_at": datetime.now(UTC).isoformat(),
        }
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(header) + "\n")
            _sync(fh)
        os.replace(tmp, path)  # a journal exists whole, or not at all
        return cls(path, JournalState(header))

    @classmethod
    def load(cls, path: Path) -> JournalState:
        """Raises ``ValueError`` when ``path`` is not a batch journal."""
        lines = path.read_text(encoding="utf-8").splitlines()
        records: list[dict[str, Any]] = []
        for number, text in enumerate(lines):
            try:
                records.append(json.loads(text))
            except ValueError:
                if number == len(lines) - 1:  # torn by a crash mid-write: never acted on
                    break
                raise ValueError(f"{path}: line {number + 1} is not JSON") from None
        if not records or records[0].get("journal") != _KIND:
            raise ValueError(f"{path} is not an actionfleet batch journal")
        if records[0].get("version") != _VERSION:
            raise ValueError(f"{path}: journal version {records[0].get('version')} is unknown")
        state = JournalState(records[0])
        for record in records[1:]:
            if "sending" in record:
                state.sending = max(state.sending, int(record["sending"]))
            elif "results" in record:
                state.checkpoint = Checkpoint(
                    int(record["results"]), int(record["out_bytes"]), int(record["next_line"])
                )
            elif record.get("finished"):
                state.finished, state.summary = True, record.get("summary")
        return state

    def _append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        _sync(self._fh)

    def sending(self, upto: int) -> None:
        """Write-ahead: lines up to ``upto`` may be sent from now on."""
        if upto > self.state.sending:
            self._append({"sending": upto})
            self.state.sending = upto

    def checkpoint(self, point: Checkpoint) -> None:
        """Call after the output's first ``point.out_bytes`` bytes are fsynced."""
        if point != self.state.checkpoint:
            self._append(
                {
                    "results": point.results,
                    "out_bytes": point.out_bytes,
                    "next_line": point.next_line,
                }
            )
            self.state.checkpoint = point

    def finish(self, summary: dict[str, Any]) -> None:
        self._append({"finished": True, "summary": summary})
        self.state.finished, self.state.summary = True, summary

    def close(self) -> None:
        self._fh.close()
