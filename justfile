# Recipes mirror the README commands; every one also works without just.

# Run the server: embedded NATS, data in ./data, http://127.0.0.1:8080
run *ARGS:
    go run ./cmd/vartalap serve {{ARGS}}

# Run every test (unit, integration, end-to-end, crash)
test:
    go test ./...

# Tests with the race detector, as CI runs them
test-race:
    go test -race ./...

# go vet + staticcheck + gofmt
lint:
    go vet ./...
    staticcheck ./...
    test -z "$(gofmt -l $(git ls-files '*.go'))"

# Go benchmarks of the hot paths
bench:
    go test -run '^$' -bench . -benchmem ./schema/ ./delivery/ ./gateway/ ./groups/
    go test -run '^$' -bench . -benchmem -benchtime 20000x ./router/

# Fuzz every decoder for a while
fuzz TIME="30s":
    go test -run '^$' -fuzz FuzzDecodeJSON -fuzztime {{TIME}} -fuzzminimizetime=1x ./schema/
    go test -run '^$' -fuzz FuzzUnmarshalProto -fuzztime {{TIME}} -fuzzminimizetime=1x ./schema/
    go test -run '^$' -fuzz FuzzRenderJSON -fuzztime {{TIME}} -fuzzminimizetime=1x ./schema/
    go test -run '^$' -fuzz FuzzToken -fuzztime {{TIME}} -fuzzminimizetime=1x ./schema/

# Build the binary
build:
    go build -o vartalap ./cmd/vartalap

# What CI runs
ci:
    bash .ci/run
