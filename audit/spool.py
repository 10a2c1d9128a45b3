"""A local spool for audit events that cannot reach Redis yet.

Each spill writes one complete, immutable file (``tmp-*`` then renamed to ``spool-*``), so
any emitter sharing the directory can replay it. Replaying claims a file by renaming it
to ``claimed-<pid>-*``; a claimed file whose process died is claimed again. Progress is
kept in an ``.offset`` sidecar after every chunk, so a crash mid-replay re-sends at most
one chunk (duplicates keep their event_id and are visible as such, never lost).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from producer.procs import pid_alive

__all__ = ["Spool"]


class Spool:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def write(self, blobs: Iterable[bytes]) -> Path | None:
        """Append-only, durable: the file is fsynced before it becomes visible."""
        data = b"".join(b + b"\n" for b in blobs)
        if not data:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex}.jsonl"
        tmp = self.dir / f"tmp-{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.dir / f"spool-{name}"
        tmp.rename(final)
        return final

    def _claimable(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found: list[Path] = []
        me = os.getpid()
        for path in sorted(self.dir.iterdir()):
            name = path.name
            if name.startswith("spool-") and name.endswith(".jsonl"):
                found.append(path)
            elif name.startswith("claimed-") and name.endswith(".jsonl"):
                pid = int(name.split("-")[1])
                if pid == me or not pid_alive(pid):
                    found.append(path)
        return found

    def pending(self) -> bool:
        return bool(self._claimable())

    def replay(self, send: Callable[[list[bytes]], None], chunk: int = 500) -> int:
        """Send every claimable file through ``send`` (which raises on failure). Returns
        the number of events sent; a failure leaves the rest for the next call."""
        sent = 0
        for path in self._claimable():
            mine = self.dir / f"claimed-{os.getpid()}-{path.name.split('-', 2)[-1]}"
            if path != mine:
                try:
                    path.rename(mine)
                except FileNotFoundError:  # another emitter claimed it first
                    continue
                old_offset = path.with_name(path.name + ".offset")
                with contextlib.suppress(FileNotFoundError):
                    old_offset.rename(mine.with_name(mine.name + ".offset"))
            sent += self._replay_file(mine, send, chunk)
        return sent

    def _replay_file(self, path: Path, send: Callable[[list[bytes]], None], chunk: int) -> int:
        offset_file = path.with_name(path.name + ".offset")
        try:
            done = int(offset_file.read_text() or 0)
        except (OSError, ValueError):
            done = 0
        lines = [ln for ln in path.read_bytes().split(b"\n") if ln]
        sent = 0
        for start in range(done, len(lines), chunk):
            send(lines[start : start + chunk])
            sent += len(lines[start : start + chunk])
            tmp = offset_file.with_suffix(".tmp")
            tmp.write_text(str(start + chunk))
            tmp.replace(offset_file)
        path.unlink()
        with contextlib.suppress(FileNotFoundError):
            offset_file.unlink()
        return sent
