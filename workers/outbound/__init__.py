"""Traffic that leaves the fleet: the egress guard (the one place that decides whether an
action may reach a host), the guarded HTTP transport built on it, and the secret store
(secrets by name, never in messages). Imports ``producer`` only."""
