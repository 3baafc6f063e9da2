#!/usr/bin/env bash
# Make a local PostgreSQL available for the HA store tests (root only; idempotent):
# install Debian's server if missing, start the cluster, create role `livemig` (CREATEDB).
# Prints the admin URL the tests use to create one database per test.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "postgres.sh: not root; PostgreSQL tests will be skipped" >&2
  exit 1
fi
if ! command -v pg_lsclusters >/dev/null || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
fi
read -r version cluster _ < <(pg_lsclusters -h | head -n1)
# started through Python, whose children inherit no file descriptors beyond stdio: the server
# outlives this script, and must not keep open what the caller holds (e.g. a flock(1) lock file)
python3 -c 'import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))' \
  pg_ctlcluster "$version" "$cluster" start >/dev/null 2>&1 || true
for _ in $(seq 1 50); do
  su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 0.2
done
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='livemig'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"create role livemig login createdb password 'livemig'\"" >/dev/null
port=$(pg_lsclusters -h | head -n1 | awk '{print $3}')
echo "postgresql+psycopg://livemig:livemig@127.0.0.1:${port}/postgres"
