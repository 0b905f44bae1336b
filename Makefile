# walsync: the two commands a newcomer needs are `make demo` and `make test`.
DEMO_SECONDS ?= 0
# make chaos: one seed (empty: the seeds 1, 2 and 3) and the workload's seconds per seed.
SEED ?=
DURATION ?= 40

.PHONY: demo test chaos bench stack-up stack-down stack-status build lint fmt

demo: ## the pipeline live on a shop catalogue; DEMO_SECONDS=N runs unattended, ending with verify
	DEMO_SECONDS=$(DEMO_SECONDS) scripts/demo

test: ## bring the stack up if needed, run every test suite, stop what was started
	scripts/test

chaos: ## the seeded differential suite with faults: make chaos SEED=n DURATION=s (no SEED: seeds 1, 2, 3)
	scripts/stack up
	cargo build --release --bin walsync --quiet
	SEED=$(SEED) DURATION=$(DURATION) cargo test --test differential -- --nocapture --test-threads=1

bench: ## figures on the local stack: source, sink vs raw bulk, end-to-end latency, vs Debezium
	scripts/stack up
	cargo bench --bench pipeline
	scripts/stack debezium-jars
	cargo build --release
	cargo bench --bench debezium

stack-up: ## install and start PostgreSQL, Kafka and the search server on 127.0.0.1
	scripts/stack up

stack-down: ## stop everything stack-up started
	scripts/stack down

stack-status:
	scripts/stack status

build:
	cargo build --release

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all
