#!/usr/bin/env bash
# Installs and starts what ActionFleet needs on a fresh Debian 12 machine, as root:
# Debian packages, the .venv, a Docker engine (bridge networking off, gVisor registered),
# and the sandbox image. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${ACTIONFLEET_HOME:-$ROOT/.actionfleet}
mkdir -p "$STATE"
say() { echo "[setup] $*" >&2; }

# 1. Debian packages -----------------------------------------------------------------
PKGS=(redis-server docker.io debootstrap runsc python3-venv chromium openssl docker-compose)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || { say "need root to install: ${missing[*]}"; exit 1; }
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$STATE/apt.log" 2>&1 \
    || { tail -20 "$STATE/apt.log" >&2; exit 1; }
fi

# 2. Python virtualenv ---------------------------------------------------------------
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.actionfleet-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  say "installing Python packages into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python -c "import celery, docker, pydantic, pytest" \
    || { say "pip install failed"; exit 1; }
  echo "$want" >"$stamp"
fi

# 3. Docker engine -------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (bridge networking off, runsc registered)"
  mkdir -p "$STATE/dockerd"
  cat >"$STATE/dockerd/daemon.json" <<'JSON'
{"bridge": "none", "iptables": false, "ip-masq": false,
 "runtimes": {"runsc": {"path": "/usr/bin/runsc",
                        "runtimeArgs": ["--network=none", "--platform=ptrace"]}}}
JSON
  setsid nohup dockerd --config-file "$STATE/dockerd/daemon.json" \
    >"$STATE/dockerd/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 "$STATE/dockerd/dockerd.log" >&2; exit 1; }
fi
if ! docker info --format '{{json .Runtimes}}' | grep -q runsc; then
  say "warning: the running Docker engine has no 'runsc' runtime; gVisor tests will fail"
fi

# 4. Sandbox image (debootstrap + docker import; cached by content hash) --------------
.venv/bin/actionfleet sandbox build >/dev/null
say "ready"
