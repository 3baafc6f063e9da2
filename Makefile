# The two commands of the README. Both bootstrap what is missing first (idempotent).
.PHONY: demo test test-fast lint bootstrap bench bench-quick chaos chaos-table clean

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

# Benchmarks: each prints JSON and runs its baseline alternated in the same run (docs/performance.md).
# Heavy runs take turns on the machine through one lock; blackout.py needs root (taps in a
# namespace) and runs bench/vswitch_pps.py itself, so without root vswitch_pps.py runs alone.
BENCH_LOCK ?= /tmp/livemig-heavy.lock
BENCH_OUT ?= bench-out
bench: bootstrap
	mkdir -p $(BENCH_OUT)
	flock $(BENCH_LOCK) .venv/bin/python bench/pause.py --runs 10 | tee $(BENCH_OUT)/pause.json
	flock $(BENCH_LOCK) .venv/bin/python bench/sweep.py --out $(BENCH_OUT)/sweep.json --png $(BENCH_OUT)/sweep.png
	if [ "$$(id -u)" = 0 ]; then \
		flock $(BENCH_LOCK) .venv/bin/python bench/blackout.py --pairs 4 | tee $(BENCH_OUT)/blackout.json; \
	else \
		flock $(BENCH_LOCK) .venv/bin/python bench/vswitch_pps.py | tee $(BENCH_OUT)/vswitch_pps.json; \
	fi

# A smoke run of the same code paths in a few minutes
bench-quick: bootstrap
	mkdir -p $(BENCH_OUT)
	flock $(BENCH_LOCK) .venv/bin/python bench/pause.py --runs 2
	flock $(BENCH_LOCK) .venv/bin/python bench/sweep.py --quick --out $(BENCH_OUT)/sweep-quick.json \
		--png $(BENCH_OUT)/sweep-quick.png

clean:
	.venv/bin/livemig down --state-dir "$${LIVEMIG_STATE:-$$HOME/.local/state/livemig}/demo" || true
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
