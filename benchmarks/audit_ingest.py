"""Audit ingest throughput: stream -> ingester -> ClickHouse vs a raw insert, same rows.

    .venv/bin/python benchmarks/audit_ingest.py [--events 200000] [--batch-size 10000]

1. Builds N distinct events with the production path (pipeline -> AuditMiddleware ->
   Redis) for a sample of actions, then copies them with fresh event ids.
2. Starts a real ingester subprocess (``python -m audit.ingester``, chDB store), pushes
   the N events into the stream as fast as one producer can, and times from the first
   XADD until the stream is empty (every event inserted and acknowledged).
3. Checks zero loss: count() and uniqExact(event_id) == N, one action_results row per
   finished event.
4. Inserts the same rows with clickhouse-connect directly into a fresh store, twice:
   ``client.insert`` (Python values) and ``client.raw_insert`` (the same JSONEachRow
   lines), both in batches of the same size.
Not a test: prints numbers; the target is >= 50,000 events/s and >= 60% of raw.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, redis_server


def sample_blobs(redis_url: str, spool: Path, actions: int) -> list[bytes]:
    """Events of ``actions`` real pipeline runs (mixed outcomes), as the stream holds them."""
    import redis

    from audit.config import STREAM
    from audit.emitter import AuditMiddleware
    from tests.audit_fixtures import action, make_pipeline, run_action

    mw = AuditMiddleware(redis_url, spool_dir=spool)
    pipeline = make_pipeline(mw)
    kinds = ["print('hello')", "fail", "timeout", "print(2)"]
    for i in range(actions):
        extra = {"memory_mb": 4096} if i % 10 == 9 else {}  # some denied
        run_action(pipeline, action(kinds[i % 4], tenant=f"tenant-{i % 25}", **extra))
    assert mw.flush(60)
    mw.close()
    client = redis.Redis.from_url(redis_url)
    blobs = [line for _, fields in client.xrange(STREAM) for line in fields[b"e"].split(b"\n")]
    client.delete(STREAM)
    return blobs


def replicate(blobs: list[bytes], n: int) -> list[bytes]:
    """N events: the samples repeated, each copy with its own event_id."""
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        blob = blobs[i % len(blobs)]
        row = json.loads(blob)
        row["event_id"] = str(uuid.UUID(int=(uuid.UUID(row["event_id"]).int & ~0xFFFFFFFFFFFF) | i))
        out.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
        i += 1
    return out


def push(redis_url: str, blobs: list[bytes], chunk: int = 2_000) -> None:
    import redis

    from audit.config import STREAM
    from audit.events import pack

    client = redis.Redis.from_url(redis_url)
    for start in range(0, len(blobs), chunk):
        with client.pipeline(transaction=False) as pipe:
            for payload in pack(blobs[start : start + chunk]):  # as a busy emitter does
                pipe.xadd(STREAM, {"e": payload})
            pipe.execute()


def through_ingester(redis_url: str, blobs: list[bytes], batch: int, store: Path) -> dict:
    import redis

    from audit.config import STREAM
    from audit.store import RemoteReader

    log = store.parent / "ingester.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audit.ingester",
            "--broker",
            redis_url,
            "--dsn",
            f"chdb://{store}",
            "--batch-size",
            str(batch),
            "--batch-age",
            "0.5",
        ],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = store / "actionfleet-query.json"
    try:
        for _ in range(600):
            if endpoint.exists():
                break
            time.sleep(0.1)
        info = json.loads(endpoint.read_text())
        db = RemoteReader(info["url"], info["token"])
        client = redis.Redis.from_url(redis_url)
        t0 = time.perf_counter()
        push(redis_url, blobs)
        pushed = time.perf_counter() - t0
        while int(client.xlen(STREAM)) > 0:
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        count, uniq = db.query(
            "SELECT count(), uniqExact(event_id) FROM actionfleet.audit_events"
        ).rows[0]
        results = db.query("SELECT count() FROM actionfleet.action_results").rows[0][0]
        finished = sum(1 for b in blobs if b'"stage":"finished"' in b)
        return {
            "elapsed_s": elapsed,
            "push_s": pushed,
            "count": count,
            "unique": uniq,
            "results": results,
            "finished": finished,
        }
    finally:
        proc.terminate()
        proc.wait(60)


def raw_inserts(blobs: list[bytes], batch: int, store: Path) -> dict:
    import clickhouse_connect

    from audit.schema import EVENT_COLUMNS
    from audit.store import migrate

    client = clickhouse_connect.get_client(interface="chdb", path=str(store))
    migrate(client)
    names = list(EVENT_COLUMNS)
    rows = []
    for b in blobs:  # decoded up front: the raw insert gets Python values for free
        r = json.loads(b)
        r["event_id"] = uuid.UUID(r["event_id"])
        r["event_time"] = datetime.fromisoformat(r["event_time"] + "+00:00")
        rows.append([r[c] for c in names])
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch):
        client.insert("actionfleet.audit_events", rows[start : start + batch], column_names=names)
    python_s = time.perf_counter() - t0
    client.command("TRUNCATE TABLE actionfleet.audit_events")
    client.command("TRUNCATE TABLE actionfleet.action_results")
    t0 = time.perf_counter()
    for start in range(0, len(blobs), batch):
        client.raw_insert(
            "actionfleet.audit_events",
            insert_block=b"\n".join(blobs[start : start + batch]),
            fmt="JSONEachRow",
        )
    json_s = time.perf_counter() - t0
    count = client.query("SELECT count() FROM actionfleet.audit_events").result_rows[0][0]
    client.close()
    return {"python_s": python_s, "json_s": json_s, "count": count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--sample-actions", type=int, default=2_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    with redis_server() as url:
        blobs = replicate(sample_blobs(url, work / "spool", args.sample_actions), args.events)
        size = sum(map(len, blobs)) / len(blobs)
        print(f"{len(blobs)} events, {size:.0f} bytes each on average, batch {args.batch_size}")
        ing = through_ingester(url, blobs, args.batch_size, work / "ingest-store")
    raw = raw_inserts(blobs, args.batch_size, work / "raw-store")
    n = len(blobs)
    ing_rate = n / ing["elapsed_s"]
    py_rate = n / raw["python_s"]
    json_rate = n / raw["json_s"]
    lossless = ing["count"] == ing["unique"] == n and ing["results"] == ing["finished"]
    print(
        f"stream -> ingester -> ClickHouse : {ing_rate:>9,.0f} events/s "
        f"({ing['elapsed_s']:.2f}s; producer pushed in {ing['push_s']:.2f}s)"
    )
    print(f"raw client.insert (Python rows)  : {py_rate:>9,.0f} events/s ({raw['python_s']:.2f}s)")
    print(f"raw client.raw_insert JSONEachRow: {json_rate:>9,.0f} events/s ({raw['json_s']:.2f}s)")
    print(f"ingester / raw client.insert     : {ing_rate / py_rate:>9.0%}")
    print(f"ingester / raw JSONEachRow insert: {ing_rate / json_rate:>9.0%}")
    print(
        f"rows: {ing['count']} (unique {ing['unique']}), action_results {ing['results']} "
        f"of {ing['finished']} finished; raw store {raw['count']}"
    )
    print("zero loss, zero duplicates" if lossless else "LOSS OR DUPLICATES")
    target = ing_rate >= 50_000 and ing_rate >= 0.6 * max(py_rate, json_rate)
    verdict = "met" if target else "NOT met"
    print(f"target (>= 50,000/s and >= 60% of the faster raw insert): {verdict}")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
