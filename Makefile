# pglocks: `make test` runs everything; `make demo` shows three workers contending.
SHELL := /bin/bash

LOCAL_DSN := postgres://postgres@127.0.0.1:5432/test?sslmode=disable

# Use the local server when one answers and no DSN was given. Without one,
# the integration tests try dockertest and otherwise fail loudly.
PGLOCKS_TEST_DSN ?= $(shell (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && echo '$(LOCAL_DSN)')
export PGLOCKS_TEST_DSN

# The disruptive phase restarts the server under test. It knows how to do
# that for the local Debian cluster; set PGLOCKS_TEST_RESTART_CMD for others.
PG_CLUSTER := $(firstword $(shell ls /etc/postgresql 2>/dev/null))
ifeq ($(PGLOCKS_TEST_DSN),$(LOCAL_DSN))
ifneq ($(PG_CLUSTER),)
PGLOCKS_TEST_RESTART_CMD ?= pg_ctlcluster --skip-systemctl-redirect $(PG_CLUSTER) main restart
endif
endif

GO ?= go

# The main run's timeout: under the 25 minutes CI allows (the suite takes
# 15-18 minutes on an idle 2-core machine). Raise it on a loaded machine.
TEST_TIMEOUT ?= 24m

.PHONY: test vet unit demo fuzz

## test: go vet, then every test (unit, examples, integration) with -race
test: vet
	@if [ -n "$$PGLOCKS_TEST_DSN" ]; then echo "PGLOCKS_TEST_DSN=$$PGLOCKS_TEST_DSN"; \
	  else echo "no PostgreSQL on 127.0.0.1:5432 and PGLOCKS_TEST_DSN unset: integration tests will try dockertest, then fail"; fi
	@if [ -z "$$PGLOCKS_TEST_PGBOUNCER_DSN" ] && ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then \
	  echo "SKIPPED the PgBouncer tests: no pgbouncer binary and PGLOCKS_TEST_PGBOUNCER_DSN unset (apt-get install -y pgbouncer; .ci/run does)"; fi
	$(GO) test -race -count=1 -parallel 8 -timeout $(TEST_TIMEOUT) ./...
	@# The benchmarks module (its own go.mod: goose, golang-migrate): key
	@# interop tests and one run of every benchmark body, no timing.
	@if [ -n "$$PGLOCKS_TEST_DSN" ]; then cd bench && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 5m ./...; \
	else echo "SKIPPED bench/ (interop tests, benchmark smoke tests): it needs PGLOCKS_TEST_DSN"; fi
	@# The frameworks module (its own go.mod: sqlx, GORM, bun, ent, pgxpool):
	@# locks through the handles each framework hands out, and their examples.
	@if [ -n "$$PGLOCKS_TEST_DSN" ]; then cd frameworks && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 5m ./...; \
	else echo "SKIPPED frameworks/ (sqlx, GORM, bun, ent, pgxpool): it needs PGLOCKS_TEST_DSN"; fi
	@# The OpenTelemetry adapter's module (its own go.mod: the OTel SDK).
	@if [ -n "$$PGLOCKS_TEST_DSN" ]; then cd otel && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 2m ./...; \
	else echo "SKIPPED otel/ (the OpenTelemetry adapter): it needs PGLOCKS_TEST_DSN"; fi
	@# Phase 2, alone: tests that restart the server or fill its lock table.
	@if [ -n "$(PGLOCKS_TEST_RESTART_CMD)" ]; then \
	  echo "disruptive phase: PGLOCKS_TEST_RESTART_CMD=$(PGLOCKS_TEST_RESTART_CMD)"; \
	  PGLOCKS_TEST_DISRUPTIVE=1 PGLOCKS_TEST_RESTART_CMD="$(PGLOCKS_TEST_RESTART_CMD)" \
	    $(GO) test -race -count=1 -timeout 5m -run '^TestDisruptive' -v ./integration; \
	else echo "SKIPPED the disruptive phase (server restart, full lock table): set PGLOCKS_TEST_RESTART_CMD to a command that restarts the server at PGLOCKS_TEST_DSN"; fi

vet:
	$(GO) vet ./...

## unit: the tests that need no database
unit:
	$(GO) test -race -count=1 ./keys ./pglock ./pglocktest ./internal/...

## fuzz: run each fuzz target for a while
fuzz:
	$(GO) test -run XXX -fuzz FuzzParse -fuzztime 30s ./keys
	$(GO) test -run XXX -fuzz FuzzLockTag -fuzztime 30s ./keys

## demo: build the pglock CLI and show three workers contending for one key
## (the local server, else DATABASE_URL, else a dockertest container)
demo:
	$(GO) build -o bin/pglock ./cmd/pglock
	$(GO) run ./internal/demo --pglock bin/pglock
