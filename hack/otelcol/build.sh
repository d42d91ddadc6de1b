#!/usr/bin/env bash
# Builds the OpenTelemetry Collector that ktel's end-to-end tests run
# (internal/otelcoltest) from hack/otelcol/builder-config.yaml, into
# .cache/otelcol/otelcol-ktel (git-ignored). Idempotent: does nothing when
# the binary exists and was built from the same configuration and builder.
#
# The builder (ocb) generates a separate Go module in .cache/otelcol; it never
# touches ktel's go.mod. Everything comes from the Go module proxy.
#
# Environment: FORCE=1 rebuilds; GO (default: go) picks the toolchain.
set -euo pipefail

# Keep in step with the versions in builder-config.yaml (core v0.x line).
BUILDER_VERSION=v0.162.0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
config=hack/otelcol/builder-config.yaml
cache=.cache
out=$cache/otelcol
bin=$out/otelcol-ktel
stamp=$out/.stamp

GO=${GO:-go}
# The builder and the generated module must resolve with this toolchain
# (no toolchain downloads), outside any go.work, and may update their own
# go.mod; the module sits inside ktel's git tree, whose VCS state is not
# its own; cgo is not needed.
export GOTOOLCHAIN=local GOWORK=off GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0

want=$({ echo "builder $BUILDER_VERSION"; cat "$config"; } | sha256sum | cut -d' ' -f1)
mkdir -p "$cache/bin"
# One build at a time (two make invocations, say); the second finds the
# first's result.
exec 9>"$cache/otelcol.lock"
flock 9
if [[ ${FORCE:-} != 1 && -x $bin && -f $stamp && $(<"$stamp") == "$want" ]]; then
	echo "otelcol: $bin is up to date" >&2
	exit 0
fi

start=$SECONDS
builder=$repo/$cache/bin/builder
if ! "$builder" version 2>&1 | grep -qx "ocb version $BUILDER_VERSION"; then
	echo "otelcol: installing builder $BUILDER_VERSION" >&2
	GOBIN=$repo/$cache/bin "$GO" install "go.opentelemetry.io/collector/cmd/builder@$BUILDER_VERSION"
fi

# Generated sources and go.mod are rewritten from scratch; a stale go.sum
# could only pin old versions.
rm -rf "$out"
mkdir -p "$out"

# The builder generates the sources and go.mod, then resolves them with a
# strict `go mod tidy`, which also loads the tests of every dependency. Some
# of those test-only modules are on the module proxy at no version we tried
# (see builder-config.yaml), so that step may fail after generation; `go mod tidy
# -e` then resolves everything the build needs, and go build below fails
# loudly if anything it needs is really missing. Compiling is left to a plain
# go build so that the flags are ours.
echo "otelcol: generating $out" >&2
log=$cache/otelcol-builder.log
if ! "$builder" --config "$config" --skip-compilation >"$log" 2>&1; then
	if [[ ! -f $out/go.mod || ! -f $out/components.go ]]; then
		cat "$log" >&2
		echo "otelcol: builder failed before generating sources" >&2
		exit 1
	fi
	echo "otelcol: builder's module resolution failed (log: $log); resolving with go mod tidy -e" >&2
fi
(cd "$out" && "$GO" mod tidy -e 2>&1 | grep -v '^go: downloading' >&2 || true)

echo "otelcol: compiling $bin" >&2
(cd "$out" && "$GO" build -trimpath -ldflags='-s -w' -o otelcol-ktel .)

"$bin" --version >&2
echo "$want" >"$stamp"
echo "otelcol: built $bin in $((SECONDS - start))s" >&2
