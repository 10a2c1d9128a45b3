#!/usr/bin/env bash
# Build the ActionFleet images without a registry and without network in the build:
#   actionfleet-sandbox:<hash>   the per-action sandbox (sandboxes/image.py, debootstrap base)
#   actionfleet:<hash>           the fleet image (worker / ingester / Flower / exporter)
#   actionfleet-browse:<hash>    the same plus Chromium (only with --browse)
#   actionfleet-redis:bookworm   Debian's redis-server (only with --redis: for the local
#                                compose override on machines that cannot pull redis)
# Each <hash> is the content hash of what goes into the image, so an unchanged image is
# never rebuilt. Also tags actionfleet:local (and actionfleet-browse:local) and writes
# deploy/images.env for docker-compose (--env-file deploy/images.env).
#
#   bash deploy/build-images.sh [--browse] [--redis]
# Env: ACTIONFLEET_IMAGE_BASE (default actionfleet-base:bookworm; python:3.11-slim works
# where a registry is reachable), ACTIONFLEET_IMAGE_EXTRAS (all: worker,audit,deploy,browse),
# PYTHON (the host Python that runs `pip wheel`, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
say() { echo "[build-images] $*" >&2; }

BROWSE=0 REDIS=0
for arg in "$@"; do
  case $arg in
    --browse) BROWSE=1 ;;
    --redis) REDIS=1 ;;
    *) echo "usage: $0 [--browse] [--redis]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$ROOT/.venv/bin/python}
EXTRAS=${ACTIONFLEET_IMAGE_EXTRAS:-all}
BASE=${ACTIONFLEET_IMAGE_BASE:-actionfleet-base:bookworm}
BROWSE_BASE=${ACTIONFLEET_BROWSE_IMAGE_BASE:-actionfleet-base-browse:bookworm}
MIRROR=${ACTIONFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=deploy/wheels
export DOCKER_BUILDKIT=0 # the classic builder: the only one this engine has

# 1. The sandbox image (and the debootstrap base it shares with the fleet image) ----------
SANDBOX_IMAGE=$("$PY" -m workers.ops.cli sandbox build 2> >(sed 's/^/[build-images] /' >&2))
say "sandbox image: $SANDBOX_IMAGE"

# 2. Wheels of every dependency, built on the host (containers cannot reach the index) ----
want=$( { cat pyproject.toml deploy/requirements.py; echo "$EXTRAS $BASE"; "$PY" -V; } \
  | sha256sum | cut -c1-16)
if [[ $(cat "$WHEELS/.stamp" 2>/dev/null) != "$want" ]]; then
  say "pip wheel: dependencies ($EXTRAS) into $WHEELS"
  find "$WHEELS" -name '*.whl' -delete
  "$PY" deploy/requirements.py pyproject.toml "$EXTRAS" >"$WHEELS/requirements.txt"
  "$PY" -m pip wheel -q --disable-pip-version-check -w "$WHEELS" \
    -r "$WHEELS/requirements.txt" pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  ls "$WHEELS"/pip-*.whl >/dev/null || { say "pip wheel failed"; exit 1; }
  # Markers are evaluated for the host's Python, not the image's (Debian's 3.11.2 needs
  # e.g. async-timeout for redis where the host's 3.11.7 does not): let the image's own
  # pip resolve offline from the wheels, and add whatever it reports missing.
  for _ in 1 2 3 4 5; do
    out=$(docker run --rm --network none -v "$ROOT/$WHEELS:/wheels:ro" "$BASE" sh -c \
      'python3 "$(ls /wheels/pip-*.whl | head -n1)/pip" install --dry-run -q \
         --disable-pip-version-check --no-index --find-links /wheels \
         --target /tmp/t -r /wheels/requirements.txt' 2>&1) && break
    missing=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' <<<"$out")
    [[ -n $missing ]] || { echo "$out" >&2; say "offline resolve in $BASE failed"; exit 1; }
    say "adding wheels the image's Python needs: $missing"
    "$PY" -m pip wheel -q --disable-pip-version-check -w "$WHEELS" $missing 2>&1 \
      | grep -v '^WARNING: Location' >&2 || true
  done
  echo "$want" >"$WHEELS/.stamp"
fi

# 3. A minimal, reproducible build context (never the .venv or .git) ---------------------
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  --exclude=__pycache__ --exclude='*.pyc' --exclude="$WHEELS/.stamp" \
  -cf "$CTX/context.tar" pyproject.toml producer workers sandboxes audit \
  deploy/Dockerfile deploy/requirements.py deploy/actionfleet.sh "$WHEELS"

build() { # build REPO TARGET BASE_IMAGE -> prints REPO:<hash>
  local repo=$1 target=$2 base=$3 base_id hash tag
  base_id=$(docker image inspect --format '{{.Id}}' "$base" 2>/dev/null || echo "$base")
  hash=$( { sha256sum <"$CTX/context.tar"; echo "$target $base_id $EXTRAS"; } \
    | sha256sum | cut -c1-12)
  tag="$repo:$hash"
  if docker image inspect "$tag" >/dev/null 2>&1; then
    say "$tag present"
  else
    say "building $tag (target $target, base $base)"
    # The dependency stage first, tagged: its cache survives, and the previous one (now
    # untagged) is pruned instead of piling up a GB per dependency change.
    docker build --network none --pull=false --force-rm -q \
      --build-arg "BASE=$base" --build-arg "EXTRAS=$EXTRAS" --target build \
      -f deploy/Dockerfile -t "$repo-deps:local" - <"$CTX/context.tar" >/dev/null
    docker image prune -f --filter label=actionfleet.stage=build >/dev/null
    docker build --network none --pull=false --force-rm -q \
      --build-arg "BASE=$base" --build-arg "EXTRAS=$EXTRAS" --target "$target" \
      --label actionfleet.image="$repo" -f deploy/Dockerfile -t "$tag" - \
      <"$CTX/context.tar" >&2
  fi
  docker tag "$tag" "$repo:local"
  # Older content tags of this repo are dead weight (a container still using one keeps it).
  docker images --format '{{.Repository}}:{{.Tag}}' "$repo" \
    | grep -v -x -e "$tag" -e "$repo:local" | xargs -r docker rmi -f >/dev/null 2>&1 || true
  echo "$tag"
}

FLEET_IMAGE=$(build actionfleet runtime "$BASE")
say "fleet image: $FLEET_IMAGE"

ROOTFS=""
cleanup_rootfs() { # never delete through a mount debootstrap or apt left inside
  [[ -n $ROOTFS && -d $ROOTFS ]] || return 0
  grep -o " $ROOTFS/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l || true
  grep -q " $ROOTFS/" /proc/self/mounts || rm -rf "$ROOTFS"
  ROOTFS=""
}
trap 'cleanup_rootfs; rm -rf "$CTX"' EXIT

debootstrap_base() { # debootstrap_base NAME:TAG INCLUDE [APT_PACKAGES]: imported once
  local name=$1 include=$2 extra=${3:-}
  docker image inspect "$name" >/dev/null 2>&1 && return 0
  ROOTFS=$(mktemp -d /tmp/actionfleet-rootfs-XXXX)
  say "debootstrap $name ($include) into $ROOTFS"
  debootstrap --variant=minbase --include="$include" bookworm "$ROOTFS" "$MIRROR" \
    >"$CTX/debootstrap.log" 2>&1 || { tail -20 "$CTX/debootstrap.log" >&2; exit 1; }
  if [[ -n $extra ]]; then
    # Big packages (Chromium) through apt in the chroot: debootstrap's own --include cannot
    # order their maintainer scripts. This runs before `docker build`, on the host.
    say "apt-get install $extra (chroot)"
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    chroot "$ROOTFS" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $extra" >"$CTX/apt.log" 2>&1 \
      || { tail -20 "$CTX/apt.log" >&2; exit 1; }
    : >"$ROOTFS/etc/resolv.conf"
  fi
  grep -o " $ROOTFS/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l || true
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/doc "$ROOTFS"/usr/share/man
  tar --numeric-owner -C "$ROOTFS" -c . | docker import - "$name" >/dev/null
  cleanup_rootfs
}

BROWSE_IMAGE=""
if ((BROWSE)); then
  # Chromium comes from Debian; with no network in the build it must already be in the
  # base: a second debootstrap variant (minbase + python3 + chromium).
  debootstrap_base "$BROWSE_BASE" python3 "chromium fonts-liberation"
  BROWSE_IMAGE=$(build actionfleet-browse browse "$BROWSE_BASE")
  say "browse image: $BROWSE_IMAGE"
fi

REDIS_IMAGE=""
if ((REDIS)); then
  # Only for the local (no registry) compose override: Debian's redis-server. Users run the
  # official redis image that docker-compose.yml names.
  debootstrap_base actionfleet-redis-rootfs:bookworm redis-server
  REDIS_IMAGE=actionfleet-redis:bookworm
  if ! docker image inspect "$REDIS_IMAGE" >/dev/null 2>&1; then
    printf '%s\n' 'FROM actionfleet-redis-rootfs:bookworm' \
      'RUN mkdir -p /data && chown redis:redis /data' \
      'USER redis' 'WORKDIR /data' 'CMD ["redis-server"]' \
      | docker build --network none -q -t "$REDIS_IMAGE" - >&2
  fi
  say "redis image: $REDIS_IMAGE"
fi

GID=$(stat -c %g /var/run/docker.sock 2>/dev/null || echo 0)
cat >deploy/images.env <<ENV
# Written by deploy/build-images.sh: docker-compose --env-file deploy/images.env ...
ACTIONFLEET_IMAGE=$FLEET_IMAGE
ACTIONFLEET_BROWSE_IMAGE=${BROWSE_IMAGE:-$FLEET_IMAGE}
ACTIONFLEET_SANDBOX_IMAGE=$SANDBOX_IMAGE
ACTIONFLEET_REDIS_IMAGE=${REDIS_IMAGE:-redis:7.2-bookworm}
DOCKER_GID=$GID
ENV
say "wrote deploy/images.env"
