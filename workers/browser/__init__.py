"""The browse primitive's parts: the browser manager (one Chromium per worker process,
a fresh context per action), the per-action egress proxy and the two kinds of refusal,
steps, extractors (text, structured data, PDF text), artifacts and logged-in sessions.
``workers.executors.browse`` puts them together. May import ``producer``,
``workers.outbound``, ``workers.policy`` and ``workers.workspace``."""
