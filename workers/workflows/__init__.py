"""Workflows owned by the fleet: ``$ref`` resolution (``refs``), durable state in Redis
(``state``), the producer's signature and scope on a workflow (``verify``), the status
producers see (``status``), the engine that advances and compensates them (``engine``),
and their Celery tasks on ``actions.workflow`` (``tasks``). docs/workflows.md."""
