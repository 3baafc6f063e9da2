# The two commands of the README. Both bootstrap what is missing first (idempotent).
.PHONY: demo test test-fast lint bootstrap bench chaos chaos-table clean

bootstrap:
	./scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/livemig demo

# As root, a local PostgreSQL is started too, so the store and HA tests run on both backends.
test: bootstrap
	LIVEMIG_TEST_POSTGRES_URL="$$(./scripts/postgres.sh 2>/dev/null || true)" .venv/bin/pytest -v --durations=15

# The whole chaos matrix against real guests (CI runs its representative subset with `make test`).
chaos: bootstrap
	LIVEMIG_TEST_POSTGRES_URL="$$(./scripts/postgres.sh 2>/dev/null || true)" .venv/bin/pytest -v -m chaos tests/chaos/test_matrix.py

# The same matrix through the operator's command, its table kept in docs/ (root: namespace hosts, a tmpfs disk).
chaos-table: bootstrap
	./scripts/chaos-table.sh

test-fast: bootstrap
	.venv/bin/pytest tests/unit -q

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: bootstrap
	.venv/bin/python bench/pause.py --runs 5

clean:
	.venv/bin/livemig down --state-dir "$${LIVEMIG_STATE:-$$HOME/.local/state/livemig}/demo" || true
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
