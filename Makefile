# lazybase — see README.md.
GO       ?= go
BIN      := bin/lazybase
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
CACHE    ?= $(CURDIR)/.cache

.PHONY: all build test bench demo lint e2e fuzz clean deploy-test soak figures

all: build

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/lazybase

test:
	$(GO) test -count=1 -timeout 20m ./...

# deploy-test: the deployment artifacts checked by their own tools, in
# modules kept apart from the main one: buildkitd.toml files and the builder
# Dockerfile with BuildKit's own loader and parser (e2e/tools), Kubernetes
# manifests decoded strictly against the Kubernetes API types.
deploy-test:
	cd e2e/tools && $(GO) test -count=1 ./...
	cd deploy/kubernetes/validate && $(GO) test -count=1 ./...

# demo: in-process registry, sample image from local files, convert, verify.
demo:
	$(GO) run -ldflags "$(LDFLAGS)" ./cmd/lazybase demo

# bench: the converter against estargz.Build on the reference images
# (BENCHFLAGS: -runs N -baseline-runs M -images debian,golang).
bench:
	LAZYBASE_CACHE=$(CACHE) $(GO) run ./internal/cmd/convbench $(BENCHFLAGS)

# figures: regenerate the README's benchmark figures (between its
# <!-- figures:NAME:begin/end --> markers) from the JSON the e2e benchmarks
# wrote to BENCH_OUT ($$LAZYBASE_BENCH_OUT, else $$LAZYBASE_CACHE/bench, else
# $(CACHE)/bench: where the benchmarks write by default).
BENCH_OUT ?= $(or $(LAZYBASE_BENCH_OUT),$(if $(LAZYBASE_CACHE),$(LAZYBASE_CACHE)/bench),$(CACHE)/bench)
figures:
	$(GO) run ./internal/cmd/figures -in $(BENCH_OUT) -readme README.md

# refimages: build the debian-like and golang-like reference images into
# $(CACHE)/refimages (the first build needs root and debootstrap).
.PHONY: refimages
refimages:
	LAZYBASE_CACHE=$(CACHE) $(GO) run ./internal/cmd/convbench -refimages

# fuzz: every fuzz target for FUZZTIME each (their seed corpora already run
# in make test).
FUZZTIME ?= 30s
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzValidate$$' -fuzztime $(FUZZTIME) ./internal/toccheck/
	$(GO) test -run '^$$' -fuzz '^FuzzRead$$' -fuzztime $(FUZZTIME) ./internal/toccheck/
	$(GO) test -run '^$$' -fuzz '^FuzzValidateEntries$$' -fuzztime $(FUZZTIME) ./internal/toccheck/
	$(GO) test -run '^$$' -fuzz '^FuzzParseEvents$$' -fuzztime $(FUZZTIME) ./mirror/
	$(GO) test -run '^$$' -fuzz '^FuzzConvertLayer$$' -fuzztime $(FUZZTIME) ./convert/
	$(GO) test -run '^$$' -fuzz '^FuzzConvertEntry$$' -fuzztime $(FUZZTIME) ./convert/
	$(GO) test -run '^$$' -fuzz '^FuzzParseProfile$$' -fuzztime $(FUZZTIME) ./prefetch/

lint:
	$(GO) vet ./...
	$(GO) vet -tags e2e ./e2e/...
	cd deploy/kubernetes/validate && $(GO) vet ./...
	shellcheck deploy/builder/entrypoint.sh
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

clean:
	rm -rf bin

# e2e: installs what the end-to-end tests need (apt packages, containerd and
# buildkit binaries cached by version under $(CACHE)/e2e/bin) and runs them
# against real daemons. Needs root. See e2e/README.md.
e2e:
	LAZYBASE_CACHE=$(CACHE) bash hack/e2e-deps.sh
	LAZYBASE_CACHE=$(CACHE) $(GO) test -tags e2e -count=1 -timeout 75m -v ./e2e/...

# soak: the long-lived builder benchmark of issue #15 (e2e TestSoak): one
# stack, SOAK_ROUNDS build-and-push rounds with rotating bases and changing
# sources, a restart of buildkitd and of the snapshotter, a final prune; a
# table row per round and a JSON file of the rows. SOAK_STRICT=1 makes the
# disk and memory targets failing asserts. Needs root. See e2e/README.md.
SOAK_ROUNDS ?= 30
SOAK_STRICT ?=
soak:
	LAZYBASE_CACHE=$(CACHE) bash hack/e2e-deps.sh
	LAZYBASE_CACHE=$(CACHE) LAZYBASE_SOAK_ROUNDS=$(SOAK_ROUNDS) LAZYBASE_SOAK_STRICT=$(SOAK_STRICT) \
		$(GO) test -tags e2e -count=1 -timeout 180m -v -run '^TestSoak$$' ./e2e/
