"""The building blocks of the delivery guarantees: rate limits, concurrency leases and quotas
(``limits``, ``admission``), exactly-once effects (``idempotency``, ``outbox``), lease renewal
(``leasekeeper``), retry policy (``retries``) and dead letters (``deadletter``).
``workers.reliability`` puts them together for the pipeline. Imports ``producer`` and
``workers.celery`` only."""
