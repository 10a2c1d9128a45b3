"""Who is asking: producer keys (``keys``: records of public keys and scopes, kept in
Redis, created, rotated and revoked by ``actionfleet keys``), the check of every action's
signature before it runs (``verify``), and the Redis ACL users that confine producers
(``acl``). Imports ``producer`` only."""
