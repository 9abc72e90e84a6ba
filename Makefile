# Run `make` or `make help` for the list of targets.

.DEFAULT_GOAL := help

# DATABASE_URL, or the URL of the database "metering" on a local PostgreSQL
# that cmd/localpg finds or starts when DATABASE_URL is unset. The assignment fails when cmd/localpg
# fails, which stops the recipe before it runs anything with an empty URL.
USE_LOCAL_DATABASE = DATABASE_URL="$${DATABASE_URL:-$$(go run ./cmd/localpg -database metering)}" && export DATABASE_URL

# Development authentication: user JWTs are signed with an HS256 secret kept
# in .data/dev-jwt-secret, created on first use. Production uses a JWKS file.
DEV_JWT_SECRET_FILE = .data/dev-jwt-secret
USE_DEV_AUTH = mkdir -p .data && { [ -s $(DEV_JWT_SECRET_FILE) ] || (umask 077 && head -c 48 /dev/urandom | base64 > $(DEV_JWT_SECRET_FILE)); } && \
	export METERING_JWT_HS256_SECRET_FILE="$${METERING_JWT_HS256_SECRET_FILE:-$(DEV_JWT_SECRET_FILE)}" \
		METERING_JWT_ISSUER="$${METERING_JWT_ISSUER:-metering-dev}" \
		METERING_JWT_AUDIENCE="$${METERING_JWT_AUDIENCE:-metering}"

.PHONY: help
help: ## Print the targets and what they do
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN { FS = ":.*## " } { printf "  %-16s %s\n", $$1, $$2 }'

.PHONY: run
run: ## Run Metering and the workspace server on a local PostgreSQL (found or started) and print development credentials
	$(USE_DEV_AUTH) && go run ./cmd/devstack

.PHONY: tokens
tokens: ## Print shell exports of the development credentials of a running make run (eval "$(make tokens)")
	@cat .data/devstack.env 2>/dev/null || { echo "no .data/devstack.env: start make run first" >&2; exit 1; }

.PHONY: migrate
migrate: ## Apply Metering's and the workspace's migrations to DATABASE_URL, or to a local PostgreSQL when unset
	$(USE_LOCAL_DATABASE) && go run ./cmd/metering migrate && go run ./cmd/workspace migrate

.PHONY: test
test: ## Run all tests with the race detector (uses DATABASE_URL, or finds or starts a local PostgreSQL)
	go test -race -count=1 ./...

.PHONY: bench
bench: ## Run the load benchmark of docs/BENCHMARKS.md (a few minutes); extra flags in BENCH_FLAGS, e.g. BENCH_FLAGS="-scenarios a -cpuprofile cpu.pprof"
	go run ./cmd/meterbench $(BENCH_FLAGS)

.PHONY: bench-smoke
bench-smoke: ## Run the load benchmark for about 1 s per cell at concurrency 1 and 4; fails when a check fails
	go run ./cmd/meterbench -duration 1s -warmup 200ms -concurrency 1,4 -accounts 500 $(BENCH_FLAGS)

.PHONY: generate
generate: ## Generate the Go code in gen/ from the protobuf files in proto/
	go tool buf generate

.PHONY: check-generated
check-generated: ## Regenerate gen/ from scratch and fail if it differs from what git has
	go tool buf generate --clean
	@git diff --exit-code --stat -- gen/ || { echo "gen/ is out of date: run 'make generate' and commit the result" >&2; exit 1; }
	@untracked="$$(git ls-files --others --exclude-standard -- gen/)"; \
	if [ -n "$$untracked" ]; then \
		printf 'gen/ has files that git does not track: run git add on them and commit\n%s\n' "$$untracked" >&2; \
		exit 1; \
	fi

.PHONY: lint
lint: ## Run go vet and buf lint
	go vet ./...
	go tool buf lint
