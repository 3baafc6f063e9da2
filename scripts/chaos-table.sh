#!/usr/bin/env bash
# The full chaos matrix through `livemig chaos`, its table written to docs/chaos-matrix.md (and the
# rows as JSON next to it). As root it gets everything it needs: namespace hosts, a tmpfs disk for
# blockd and, through scripts/postgres.sh, a fresh PostgreSQL database for the LMO.
set -euo pipefail
cd "$(dirname "$0")/.."
db_args=()
if admin="$(./scripts/postgres.sh 2>/dev/null)"; then
  name="livemig_chaos_$$"
  su postgres -c "psql -qc 'create database ${name} owner livemig'" >/dev/null
  trap 'su postgres -c "psql -qc \"drop database if exists ${name} with (force)\"" >/dev/null' EXIT
  db_args=(--db "${admin%/postgres}/${name}")
fi
.venv/bin/livemig chaos --own-region "${db_args[@]}" --json --markdown docs/chaos-matrix.md "$@" > docs/chaos-matrix.json
