#!/usr/bin/env bash
# The full chaos matrix through `livemig chaos`, its table written to docs/chaos-matrix.md (and the
# rows as JSON next to it). As root it gets everything the matrix needs: namespace hosts, a tmpfs
# disk for blockd and a PostgreSQL cluster of its own for the LMO (the PostgreSQL scenario stops and
# starts it, so it must not be a cluster anyone else uses). Extra arguments go to `livemig chaos`.
set -euo pipefail
cd "$(dirname "$0")/.."
db_args=()
cluster="livemig-chaos"
if [ "$(id -u)" -eq 0 ] && ./scripts/postgres.sh >/dev/null 2>&1; then
  version="$(pg_lsclusters -h | head -n1 | awk '{print $1}')"
  if ! pg_lsclusters -h | awk '{print $2}' | grep -qx "$cluster"; then
    pg_createcluster "$version" "$cluster" >/dev/null
  fi
  # through Python: the server inherits no descriptor of ours (a flock(1) lock held by the caller)
  python3 -c 'import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))' \
    pg_ctlcluster "$version" "$cluster" start >/dev/null 2>&1 || true
  port="$(pg_lsclusters -h | awk -v c="$cluster" '$2 == c {print $3}')"
  for _ in $(seq 1 50); do su postgres -c "psql -p $port -qtAc 'select 1'" >/dev/null 2>&1 && break; sleep 0.2; done
  su postgres -c "psql -p $port -qtAc \"select 1 from pg_roles where rolname='livemig'\"" | grep -q 1 ||
    su postgres -c "psql -p $port -qc \"create role livemig login createdb password 'livemig'\"" >/dev/null
  su postgres -c "psql -p $port -qc 'drop database if exists chaos with (force)'" >/dev/null
  su postgres -c "psql -p $port -qc 'create database chaos owner livemig'" >/dev/null
  trap 'pg_dropcluster --stop "$version" "$cluster" >/dev/null 2>&1 || true' EXIT
  db_args=(--db "postgresql+psycopg://livemig:livemig@127.0.0.1:${port}/chaos")
fi
LIVEMIG_CHAOS_COMMAND="make chaos-table (scripts/chaos-table.sh: livemig chaos --own-region --db <its own PostgreSQL> $*)" \
  .venv/bin/livemig chaos --own-region "${db_args[@]}" --json --markdown docs/chaos-matrix.md "$@" > docs/chaos-matrix.json
