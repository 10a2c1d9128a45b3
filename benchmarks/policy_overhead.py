"""Policy evaluation overhead: trivial actions (files `stat`, as in fleet_overhead.py) on a
worker whose policy file has 200 Cedar rules, against the same actions on a worker with
no rules, in the same run.

    .venv/bin/python benchmarks/policy_overhead.py [-n 2000] [--concurrency 2] [--repeat 5]

The 200 rules are a mix over the vocabulary (docs/policy.md): per group and path for
files deletes, per host for API writes, approval rules per recipient domain, read-only
rules per agent pattern, per-path rules on every files operation; 80 of them can apply to
a files `stat` and are evaluated for each one (the set is sliced per Cedar action when the
file loads). Workers keep the decisions they made (a decision is a pure function of the
request and the rules): "drain" sends the same action over and over, as fleet_overhead.py
does, so after the first it is a cache hit; "drain, uncached" sends every action as an agent
of its own (the rules read the agent's id), so every one is evaluated by Cedar; "drain,
labels" gives every action a label of its own, which no rule reads, so the first decision
answers the rest. Each worker has its own Redis database;
drain and closed loop, alternating pairs, ratios the median of the per-pair ratios.
Target (issue 22): rules add at most 10 %, i.e. a with-rules/without drain ratio of at
least 0.90.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import celery_worker, redis_server
from fleet_overhead import POLICY, STAT, closed_loop, drain, paired


def rules(count: int = 200) -> str:
    out = []
    for i in range(count):
        head = f'@id("r{i}")\n@description("generated rule {i}")\n'
        kind = i % 5
        if kind == 0:
            body = (
                f'forbid (principal in Group::"g{i % 10}", action == Action::"files:delete", '
                f'resource) when {{ resource.path like "dir{i}/*" }};'
            )
        elif kind == 1:
            body = (
                'forbid (principal, action == Action::"api:POST", resource) '
                f'when {{ resource.host == "h{i}.example.com" }};'
            )
        elif kind == 2:
            head += '@outcome("approval")\n'
            body = (
                'forbid (principal, action == Action::"email:send", resource) '
                f'when {{ resource.domains.contains("d{i}.example.com") }};'
            )
        elif kind == 3:
            body = (
                'forbid (principal, action in Action::"read_only", resource) '
                f'when {{ principal.id like "agent{i}-*" }};'
            )
        else:
            body = (
                'forbid (principal, action in Action::"files", resource) '
                f'when {{ resource.path like "secret{i}/*" }};'
            )
        out.append(head + body)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="actions per throughput run")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker")
    parser.add_argument("--repeat", type=int, default=5, help="without/with pairs")
    parser.add_argument("--rules", type=int, default=200, help="rules in the policy")
    args = parser.parse_args()

    import redis
    import yaml
    from celery import Celery

    from producer.client import ActionClient
    from workers.config import Settings
    from workers.policy import load_policy

    home = tempfile.mkdtemp(prefix="af-bench-")
    plain, ruled = Path(home) / "plain.yaml", Path(home) / "rules.yaml"
    plain.write_text(POLICY)
    data = yaml.safe_load(POLICY)
    data["rules"] = {
        "groups": {f"g{g}": [f"team{g}-*"] for g in range(10)},
        "cedar": rules(args.rules),
    }
    ruled.write_text(json.dumps(data))  # JSON is YAML
    loaded = load_policy(ruled).ruleset
    assert loaded is not None and loaded.count == args.rules, "the rules did not load"
    env = {"ACTIONFLEET_HOME": home, "ACTIONFLEET_AUTH": "off"}
    write = STAT | {"payload": {"op": "write", "path": "hello.txt", "content": "hi"}}
    n, c = args.n, args.concurrency

    def ok(h: object) -> None:
        result = h.result(timeout=300)  # type: ignore[attr-defined]
        assert result.status == "succeeded", result

    with redis_server() as url0:
        url1 = url0.rsplit("/", 1)[0] + "/1"
        r0, r1 = redis.Redis.from_url(url0), redis.Redis.from_url(url1)
        without = ActionClient(url0, settings=Settings(broker_url=url0), key=None)
        with_rules = ActionClient(url1, settings=Settings(broker_url=url1), key=None)
        without.key = with_rules.key = None
        app0 = Celery(set_as_current=False, broker=url0)
        app1 = Celery(set_as_current=False, broker=url1)

        def plain_all() -> list:
            return without.submit_many([dict(STAT) for _ in range(n)])

        def ruled_all() -> list:
            return with_rules.submit_many([dict(STAT) for _ in range(n)])

        # Every action a request Cedar has not decided yet (an agent of its own, and the
        # rules read the agent's id), so no decision is answered from the workers' kept
        # decisions: the worst case.
        def distinct() -> list[dict]:
            return [STAT | {"agent_id": f"bench-{i}"} for i in range(n)]

        # Every action a label of its own: no rule reads labels, so the kept decision of
        # the first answers the rest (decisions are keyed by what the rules read).
        def labelled() -> list[dict]:
            return [STAT | {"labels": {"n": str(i)}} for i in range(n)]

        def plain_distinct() -> list:
            return without.submit_many(distinct())

        def ruled_distinct() -> list:
            return with_rules.submit_many(distinct())

        def plain_labelled() -> list:
            return without.submit_many(labelled())

        def ruled_labelled() -> list:
            return with_rules.submit_many(labelled())

        with (
            celery_worker(
                "workers.app", "actions.files", url0, c, tag="-plain",
                ACTIONFLEET_POLICY=str(plain), **env,
            ) as w0,
            celery_worker(
                "workers.app", "actions.files", url1, c, tag="-rules",
                ACTIONFLEET_POLICY=str(ruled), **env,
            ) as w1,
        ):  # fmt: skip
            assert without.run(write, timeout=60).status == "succeeded"
            assert with_rules.run(write, timeout=60).status == "succeeded"
            rows = [
                (
                    "drain",
                    *paired(
                        args.repeat,
                        lambda: drain(app0, r0, "actions.files", [w0], True, plain_all, ok),
                        lambda: drain(app1, r1, "actions.files", [w1], True, ruled_all, ok),
                    ),
                ),
                (
                    "drain, uncached",
                    *paired(
                        args.repeat,
                        lambda: drain(app0, r0, "actions.files", [w0], True, plain_distinct, ok),
                        lambda: drain(app1, r1, "actions.files", [w1], True, ruled_distinct, ok),
                    ),
                ),
                (
                    "drain, labels",
                    *paired(
                        args.repeat,
                        lambda: drain(app0, r0, "actions.files", [w0], True, plain_labelled, ok),
                        lambda: drain(app1, r1, "actions.files", [w1], True, ruled_labelled, ok),
                    ),
                ),
                (
                    "closed loop",
                    *paired(
                        args.repeat,
                        lambda: closed_loop(plain_all, ok),
                        lambda: closed_loop(ruled_all, ok),
                    ),
                ),
            ]
        for client in (without, with_rules):
            client.close()

    print(
        f"policy overhead: {n} files stat actions per run, concurrency {c}, {args.repeat} "
        f"pairs, {args.rules} rules"
    )
    print(f"{'mode':<16} {'no rules/s':>11} {'rules/s':>9} {'rules/none':>11}  per pair")
    for label, bases, subjects, ratios in rows:
        print(
            f"{label:<16} {statistics.median(bases):>11.0f} {statistics.median(subjects):>9.0f}"
            f" {statistics.median(ratios):>11.3f}  " + " ".join(f"{x:.3f}" for x in ratios)
        )
    print("target: drain ratio >= 0.90 (200 rules add at most 10 % to a trivial action)")


if __name__ == "__main__":
    main()
