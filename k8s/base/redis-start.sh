#!/bin/sh
# Starts redis-server with ActionFleet's ACL users (workers/auth/acl.py; docs/security.md):
# the default user off, af-admin (the operator) and af-worker (workers, ingester, Flower,
# metrics) with the SHA-256 of AF_REDIS_ADMIN_PASSWORD / AF_REDIS_WORKER_PASSWORD, and the
# producer users (p-<key id>) that `actionfleet keys` saved into the same file before.
# Used by docker-compose.yml, deploy/docker-compose.local.yml and k8s/base/redis.yaml;
# arguments go to redis-server.
set -eu
: "${AF_REDIS_ADMIN_PASSWORD:?set AF_REDIS_ADMIN_PASSWORD}"
: "${AF_REDIS_WORKER_PASSWORD:?set AF_REDIS_WORKER_PASSWORD}"
acl=${AF_REDIS_ACLFILE:-/data/users.acl}
sha() { printf %s "$1" | sha256sum | cut -c1-64; }
{
  echo "user default off resetkeys resetchannels -@all"
  echo "user af-admin on #$(sha "$AF_REDIS_ADMIN_PASSWORD") ~* &* +@all"
  echo "user af-worker on #$(sha "$AF_REDIS_WORKER_PASSWORD") ~* &* +@all -@admin -@dangerous +info +client|setname +client|getname +client|id"
  if [ -f "$acl" ]; then grep '^user p-' "$acl" || true; fi
} >"$acl.new"
chmod 600 "$acl.new"
mv "$acl.new" "$acl"
exec redis-server --aclfile "$acl" "$@"
