"""The worker side: the Celery app, the execution pipeline and everything it runs on.

    app.py          the Celery app and one task per primitive (``celery -A workers.app``)
    pipeline.py     an action's path, top to bottom in one place
    middleware.py   the pipeline's hooks and the per-attempt context
    policy.py       per-tenant policy: primitives, ceilings, egress rules
    reliability.py  the pipeline's guard: limits, idempotency, retries, dead letters
    config.py       every ACTIONFLEET_* knob, typed
    celery/         Celery/kombu integration: broker transport, result backend, Lua
                    calls, CPU pinning
    guarantees/     delivery guarantees' building blocks: limits, idempotency, leases,
                    retries, dead letters, the email outbox
    outbound/       traffic leaving the fleet: egress guard, guarded HTTP, secrets
    workspace/      the tenant workspace nothing escapes
    executors/      one executor per primitive
    browser/        the browse primitive's parts
    ops/            operating a fleet: the operator CLI, local fleet, metrics, Flower

May import ``producer``, ``sandboxes`` and ``audit``; nothing outside imports it, except
the operator commands that join ``actionfleet`` through an entry point. Inside, imports go
down the list of docs/architecture.md (tests/test_layout.py checks it).
"""
