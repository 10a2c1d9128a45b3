"""``actionfleet batch IN.jsonl --out OUT.jsonl``: a file of actions through the fleet,
streamed (bounded memory), in input order, resumable from its journal (docs/batch.md)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from producer.batch import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    BatchEntry,
    BatchRunner,
    BatchSummary,
)
from producer.cli_io import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK
from producer.cli_io import eprint as _eprint
from producer.errors import FleetUnavailable, InvalidAction
from producer.journal import Checkpoint, Journal, JournalState, scan_input

__all__ = ["add_batch_parser", "cmd_batch"]

# Write-ahead: one journal record (and fsync) per this many input lines sent.
SEND_AHEAD = 256
CHECKPOINT_S = 1.0  # how often the output is fsynced and a checkpoint written


def add_batch_parser(sub: Any) -> None:
    p = sub.add_parser(
        "batch",
        help="run a JSONL file of actions; results in input order, resumable",
        description="Streams IN through the fleet with at most --window actions in flight "
        "and writes one result per non-blank input line to OUT, in input order. A journal "
        "(OUT.journal) makes it resumable: after a crash or kill, run the same command with "
        "--resume; only lines without a result are sent, and none runs twice. "
        "Exit 0: every action succeeded; 1: some did not, or the fleet is unreachable; "
        "2: bad arguments, or OUT holds an unfinished batch (docs/batch.md).",
    )
    p.add_argument("input", help="JSONL file, one action per line (blank lines skipped)")
    p.add_argument("--out", required=True, help="where to write one result per line")
    p.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"actions in flight at most (1..{MAX_WINDOW}; default {DEFAULT_WINDOW})",
    )
    p.add_argument("--rate", type=float, default=None, help="send at most R actions per second")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for each result once it is the oldest in flight (default: "
        "no limit); a result not there by then is written as failed/timeout",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished batch journaled next to OUT (same input required)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start a new batch even though OUT holds an unfinished one (runs every line "
        "again, under a new batch id)",
    )
    p.add_argument(
        "--batch-id",
        default=None,
        help="the batch id (default: a new random one); action ids and idempotency keys "
        "derive from it and the line number",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on when stderr is a terminal)",
    )
    p.set_defaults(func=cmd_batch)


def _items(path: Path, start_line: int) -> Iterator[tuple[int, Any]]:
    """(line number, action) of every non-blank line from ``start_line`` on, lazily."""
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, 1):
            if number < start_line or not text.strip():
                continue
            try:
                raw: Any = orjson.loads(text)
            except orjson.JSONDecodeError:
                raw = text.rstrip("\n")
            yield number, raw


class _Output:
    """The result file, written in order and checkpointed into the journal."""

    def __init__(self, path: Path, journal: Journal, start: Checkpoint) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch()
        self.fh: IO[bytes] = path.open("r+b")
        self.fh.truncate(start.out_bytes)  # drop results written after the last checkpoint
        self.fh.seek(start.out_bytes)
        self.journal = journal
        self.results, self.next_line = start.results, start.next_line
        self._last = time.monotonic()

    def write(self, entry: BatchEntry) -> None:
        self.fh.write(orjson.dumps(entry.result, default=str) + b"\n")
        self.results += 1
        self.next_line = entry.line + 1
        if time.monotonic() - self._last >= CHECKPOINT_S:
            self.checkpoint()

    def checkpoint(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.journal.checkpoint(Checkpoint(self.results, self.fh.tell(), self.next_line))
        self._last = time.monotonic()

    def close(self) -> None:
        self.fh.close()


def _count_earlier(out: Path, upto: int, summary: BatchSummary) -> None:
    """Count the results an earlier run wrote (the output's first ``upto`` bytes)."""
    with out.open("rb") as fh:
        left = upto
        for line in fh:
            if left <= 0:
                break
            left -= len(line)
            summary.add(BatchEntry(0, json.loads(line)))
            summary.earlier += 1


def _refuse(message: str) -> int:
    _eprint(f"error: {message}")
    return EXIT_INVALID


def _open_state(args: argparse.Namespace, jpath: Path, digest: str) -> JournalState | int | None:
    """The journal to resume, None for a new batch, or an exit code."""
    state = None
    if jpath.exists():
        try:
            state = Journal.load(jpath)
        except (OSError, ValueError) as exc:
            return _refuse(f"{exc}; remove it or write to another --out")
    if args.resume:
        if state is None:
            return _refuse(f"nothing to resume: no journal at {jpath}; run without --resume")
        if state.header.get("input_sha256") != digest:
            return _refuse(
                f"{args.input} changed since batch {state.batch_id} started (its journal "
                f"recorded another SHA-256): resume with the original input, or --restart"
            )
        if args.batch_id and args.batch_id != state.batch_id:
            return _refuse(f"--batch-id {args.batch_id} but the journal's is {state.batch_id}")
        return state
    if state is not None and not state.finished and not args.restart:
        return _refuse(
            f"{args.out} holds unfinished batch {state.batch_id} "
            f"({state.checkpoint.results} results so far): continue it with --resume, or "
            "start over with --restart (every line runs again)"
        )
    return None


def cmd_batch(args: argparse.Namespace) -> int:
    from producer.client import ActionClient

    src, out = Path(args.input), Path(args.out)
    if not src.is_file():
        return _refuse(f"no input file {src}")
    jpath = Journal.path_for(out)
    digest, total = scan_input(src)
    opened = _open_state(args, jpath, digest)
    if isinstance(opened, int):
        return opened
    state = opened
    if state is not None and state.finished:
        _eprint(f"batch {state.batch_id} already finished; nothing sent")
        _eprint("summary: " + json.dumps(state.summary))
        ok = (state.summary or {}).get("succeeded", 0) == (state.summary or {}).get("total")
        return EXIT_OK if ok else EXIT_FAILED
    try:
        client = ActionClient()
    except FleetUnavailable as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    with client:
        try:
            runner = BatchRunner(
                client,
                batch_id=state.batch_id if state else args.batch_id,
                window=args.window,
                rate=args.rate,
                timeout=args.timeout,
            )
        except InvalidAction as exc:
            for e in exc.errors:
                _eprint(f"invalid: --{e['field']}: {e['reason']} -> {e['fix']}")
            return EXIT_INVALID
        if state is None:
            journal = Journal.create(
                jpath,
                batch_id=runner.batch_id,
                input_path=src,
                input_sha256=digest,
                input_lines=total,
            )
        else:
            journal = Journal(jpath, state)
        try:
            return _run(args, runner, journal, src, out, total)
        finally:
            journal.close()


def _run(
    args: argparse.Namespace,
    runner: BatchRunner,
    journal: Journal,
    src: Path,
    out: Path,
    total: int,
) -> int:
    from tqdm import tqdm

    start = journal.state.checkpoint
    earlier_mark = journal.state.sending  # lines at or below it may have been sent
    summary = BatchSummary(runner.batch_id)
    if start.out_bytes:
        _count_earlier(out, start.out_bytes, summary)
    output = _Output(out, journal, start)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = tqdm(
        total=total,
        initial=start.results,
        unit=" actions",
        file=sys.stderr,
        disable=not show,
        dynamic_ncols=True,
        mininterval=0.25,
        smoothing=0.05,
    )

    def before_send(line: int) -> None:
        if line > journal.state.sending:
            journal.sending(line + SEND_AHEAD)

    # SIGTERM ends the batch like Ctrl-C: results so far are checkpointed for --resume.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        entries = runner.stream(
            _items(src, start.next_line),
            maybe_sent=lambda line: line <= earlier_mark,
            before_send=before_send,
        )
        for entry in entries:
            output.write(entry)
            summary.add(entry)
            bar.update()
            if summary.total % 200 == 0:
                bar.set_postfix_str(_counts(summary), refresh=False)
        output.checkpoint()
    except KeyboardInterrupt:
        output.checkpoint()
        bar.close()
        _eprint(
            f"interrupted after {output.results} results; continue with: actionfleet batch "
            f"{src} --out {out} --resume"
        )
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        output.close()
    bar.set_postfix_str(_counts(summary), refresh=False)
    bar.close()
    report = summary.to_dict()
    journal.finish(report)
    _eprint(
        f"batch {runner.batch_id}: {summary.total} results ({_counts(summary)}) in "
        f"{report['elapsed_s']}s; output {out}"
    )
    _eprint("summary: " + json.dumps(report))
    return EXIT_OK if summary.all_succeeded else EXIT_FAILED


def _counts(summary: BatchSummary) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(summary.statuses.items()))
