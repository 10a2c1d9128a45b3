"""The agent's front door: an MCP server (``actionfleet mcp``) on the official ``mcp`` SDK.

``identity`` decides who a client is (the stdio server's own key and scope, or an HTTP
client's bearer producer key, checked against the fleet's key records); ``server`` maps
the protocol onto the fleet: the five tools of ``producer.tools``, run through
``ActionClient`` with the caller's key, and the caller's workspace and action traces as
resources. It executes nothing itself. May import ``producer``, ``audit``,
``workers.auth`` and ``workers.config``."""
