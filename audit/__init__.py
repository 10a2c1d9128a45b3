"""The audit trail: the event model (``events``, ``redact``, ``schema``), the stream from
workers (``emitter``, ``spool``), the ingester into ClickHouse (``ingester``, ``ingest_*``,
``store``), reads (``reports``, ``query_server``) and ``actionfleet audit`` (``cli``).

Imports ``producer`` only; the emitter is a pipeline middleware by shape, not by import.
"""
