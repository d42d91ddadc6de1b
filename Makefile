# ktel build, test and benchmark entry points. See README.md.

GO          ?= go
BPF_CLANG   ?= clang-19
BPF_CFLAGS  ?= -O2 -g -Wall -Werror
BINARY      ?= bin/ktel
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION    ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS     := -X github.com/ktel-dev/ktel/internal/version.Version=$(VERSION) \
               -X github.com/ktel-dev/ktel/internal/version.Revision=$(REVISION)

export BPF_CLANG BPF_CFLAGS

.PHONY: all build generate generate-check run test test-unit bench bench-lb bench-kube fuzz otelcol kube test-kernel deploy-tools deploy-go-tools deploy-check reliability soak vet tools clean

all: build

# Static, without cgo: only then can ktel drop the capabilities of all its
# threads after attaching (see KTEL_KEEP_CAPABILITIES).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BINARY) ./cmd/ktel

# Regenerate BPF objects and syscall tables. Needs clang-19 (`make tools`).
# The README's configuration table: go test ./internal/config -run Readme -update.
generate:
	$(GO) generate ./...

# Fails when committed generated files differ from a fresh `make generate`.
GENERATED = ':(glob)**/*_bpfel.go' ':(glob)**/*_bpfel.o' ':(glob)**/names_gen.go'
generate-check: generate
	@git diff --exit-code --stat -- $(GENERATED) || { echo "generated files are stale: run 'make generate' and commit" >&2; exit 1; }
	@test -z "$$(git ls-files --others --exclude-standard -- $(GENERATED))" || { echo "make generate produced untracked files:" >&2; git ls-files --others --exclude-standard -- $(GENERATED) >&2; exit 1; }

# Installs the Debian packages the build, tests and benchmarks use.
tools:
	./scripts/install-deps.sh

# Runs ktel with defaults (as root). Scrape http://localhost:9437/metrics.
run: tools build
	./$(BINARY)

vet:
	$(GO) vet ./...

test-unit:
	$(GO) test ./...

# The whole suite. As root with KTEL_PRIVILEGED_TESTS=1, privileged tests run
# and may not skip. Packages run one at a time (-p 1): privileged tests load
# host-wide programs and cause host-wide scheduling, which must not overlap.
test: tools otelcol kube deploy-go-tools
	KTEL_PRIVILEGED_TESTS=$${KTEL_PRIVILEGED_TESTS-1} $(GO) test -count=1 -p 1 -timeout 20m ./...

# ktel on Debian 12's stock kernel (6.1, linux-image-cloud-amd64) under qemu
# in software emulation (hack/kernel/run.sh): `ktel check` with every probe,
# forced tcx failing before 6.6, `ktel check` with the capabilities deploy/
# grants, a serve whose scrape shows every probe up, and the tests of
# KERNEL_PKGS, none skipping: by default every package with privileged
# tests (hack/kernel/packages.sh), with the static ktel, the collector and
# the control plane copied into the guest, but test/deploy, which checks
# what ships outside the binary with the Go toolchain, systemd-analyze,
# helm, kustomize and Prometheus, none of it kernel-dependent (make test
# runs it). Two guests side by side (KERNEL_GUESTS), each with a share of
# the packages; about 25 minutes of guest time (README: Kernels tested).
# KERNEL_PKGS=./bpf/netdev runs only that package; KERNEL_RUN=TestX only
# the tests matching it (verbose, no check or scrape); KERNEL_SKIP=TestX
# leaves those out.
KERNEL_PKGS ?= $(shell ./hack/kernel/packages.sh)
test-kernel: tools build otelcol kube
	KTEL_BINARY=$(BINARY) KERNEL_SKIP='$(KERNEL_SKIP)' ./hack/kernel/run.sh $(KERNEL_PKGS)

# Pinned helm/kustomize (Go module proxy) and the dashboards' npm packages.
deploy-tools:
	./deploy/validate/install-tools.sh

# Only helm and kustomize: test/deploy applies the manifests with them.
deploy-go-tools:
	./deploy/validate/install-tools.sh --go-only

# Manifests (kustomize, helm lint/template, strict decoding), alert-rule unit
# tests, dashboard schema. Dashboard/alert PromQL runs in test/deploy (make test).
deploy-check: deploy-tools
	cd deploy/validate && $(GO) test -count=1 ./...
	promtool check rules deploy/prometheus/ktel-alerts.yaml
	promtool test rules deploy/prometheus/ktel-alerts_test.yaml
	cd dashboards/test && npm test

# Builds the OpenTelemetry Collector that end-to-end tests run
# (.cache/otelcol/otelcol-ktel, from hack/otelcol/builder-config.yaml).
# A no-op when up to date; FORCE=1 rebuilds.
otelcol:
	bash hack/otelcol/build.sh

# Builds the Kubernetes control plane that tests run (internal/kubetest):
# etcd, kube-apiserver, kube-controller-manager and kubectl at pinned
# versions, and kube-proxy for make bench-kube, into .cache/kube/bin. A no-op when up to date; FORCE=1 rebuilds.
# Cold: 10 to 30 minutes on two cores, and about 4 GB of Go build cache.
kube:
	bash hack/kube/build.sh

# Short fuzzing of every parser of outside input (ring-buffer records, the
# services file); CI runs it with FUZZTIME=10s.
FUZZTIME ?= 30s
FUZZ_TARGETS = ./bpf/syscall:FuzzDecodeEvent ./bpf/runqlat:FuzzDecodeEvent \
               ./bpf/tcpretrans:FuzzDecodeEvent ./internal/lb:FuzzParse ./internal/lb:FuzzParseJSON \
               ./internal/cgroups:FuzzParsePath
fuzz:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "fuzz $$pkg $$fn"; \
		$(GO) test -run '^$$' -fuzz "^$$fn$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	done

# Reliability tests alone, the scrape load at its full 60 s.
reliability:
	KTEL_PRIVILEGED_TESTS=1 KTEL_RELIABILITY_LONG=1 $(GO) test -count=1 -v -timeout 10m ./test/reliability/

# Soak test, not in CI: 30 minutes by default (SOAK_DURATION=5m make soak).
soak: build
	SOAK_BINARY=$(BINARY) ./hack/soak.sh

# Connect latency and apply time of the lb probe against direct connects and
# kube-proxy-style iptables (nft and legacy), 1 to 100,000 services, in private
# network namespaces and child cgroups it creates and removes. As root.
bench-lb: tools
	$(GO) run ./cmd/ktel-bench-lb -svg cmd/ktel-bench-lb/bench-lb.svg

# The lb probe fed by a real API server (KTEL_LB_SOURCE=kubernetes) against
# kube-proxy from the same release, in its iptables and nftables modes, each
# in a network namespace of its own: programming latency, connect latency and
# RSS with 1, 100 and 10,000 Services (internal/kubebench; about 20 minutes
# on two cores). Not part of CI. As root. BENCHKUBEFLAGS passes environment,
# e.g. BENCHKUBEFLAGS="KTEL_BENCH_KUBE_SIZES=1,100 KTEL_BENCH_KUBE_CHURN=10".
BENCHKUBEFLAGS ?=
bench-kube: kube
	env KTEL_PRIVILEGED_TESTS=1 KTEL_BENCH_KUBE=1 $(BENCHKUBEFLAGS) $(GO) test -tags kubebench -count=1 -v -timeout 60m -run '^TestBenchKube$$' ./internal/kubebench/

# Every overhead measurement side by side (see BENCHMARKS.md), e.g.
# make bench BENCHFLAGS="-busy 20s -out /tmp/bench.md".
BENCHFLAGS ?=
bench: tools build
	$(GO) run ./cmd/ktel-bench -daemon $(BINARY) $(BENCHFLAGS)

clean:
	rm -rf bin .cache/otelcol .cache/bin/builder .cache/kube
