"""Workflows owned by the fleet: ``$ref`` resolution (``refs``), durable state in Redis
(``state``), the engine that advances and compensates them (``engine``), and their Celery
tasks on ``actions.workflow`` (``tasks``). docs/workflows.md."""
