"""The tenant workspace: ``tenant`` (``Workspaces``, ``TenantWorkspace``), path rules as text
(``paths``), the descriptor walk (``walk``), entries and refusals (``entries``), atomic
mutations (``atomic``) and quotas (``quota``). Imports ``producer`` and ``sandboxes.base``."""
