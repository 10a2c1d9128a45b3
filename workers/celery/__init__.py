"""Celery and kombu integration: the Redis transport whose fetch cannot lose a message, the
result backend that stores a result and the settle writes in one round trip, and the
pinned-connection Lua call both use, and CPU pinning of a worker and its pool processes
(``affinity``). Imports ``producer`` only."""
