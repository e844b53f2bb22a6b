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
	$(GO) run honnef.co/go/tools/cmd/staticcheck@2025.1.1 ./...

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 60s ./internal/graph/

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./internal/...

tidy:
	$(GO) mod tidy
