# callbot — see README.md. `make demo` runs it, `make test` proves it.
GO ?= go
# Packages that do not import msgraph-sdk-go run under the race detector; the SDK's race build
# is too heavy for a 2-core machine and brings no code of ours.
RACE_PKGS = $(shell $(GO) list ./... | grep -v -e /internal/graph/msgraph -e /cmd/callbot)

.PHONY: demo test race lint fuzz bench build tidy

demo:
	$(GO) run ./cmd/callbot demo

build:
	$(GO) build -o bin/callbot ./cmd/callbot

test:
	$(GO) vet ./...
	$(GO) test -count=1 ./...
	$(GO) test -count=1 -race $(RACE_PKGS)

race:
	$(GO) test -count=1 -race $(RACE_PKGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime 60s ./internal/graph/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeDifferential$$' -fuzztime 60s ./internal/graph/

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./internal/...

tidy:
	$(GO) mod tidy

# Load test of the real program against graphsim and a redis-server of its own (issue #3);
# method and figures in docs/performance.md. Other settings: make bench-load LOAD="-rate 100 -json".
.PHONY: bench-load
bench-load:
	$(GO) run ./cmd/callbot-load $(or $(LOAD),-rate 200 -duration 40s)

# Fault-injection tests (issue #3, docs/chaos.md): real callbot processes, redis-server and
# graphsim on loopback; an instance, Redis, a Sentinel master and Cluster masters are killed
# mid-traffic, and instances are replaced in turn (SIGTERM, and SIGKILL). About 3 minutes.
.PHONY: chaos
chaos:
	$(GO) test -tags chaos -count=1 -v -timeout 10m ./chaos/
