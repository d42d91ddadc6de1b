#!/usr/bin/env bash
# Installs the pinned tools that check deploy/ and dashboards/ into
# .cache/deploy/bin (git-ignored), from the Go module proxy and the npm
# registry: helm and kustomize (built from source with the local Go), and
# dashboards/test's TypeScript and @grafana/schema (npm ci, from
# package-lock.json). Idempotent and quick when they are present.
# --go-only: helm and kustomize alone (what test/deploy applies to a real
# API server with), without npm.
set -euo pipefail
cd "$(dirname "$0")/../.."

HELM_VERSION=v3.22.0
# v5.8.3 needs Go 1.27.
KUSTOMIZE_VERSION=v5.8.2

bin=$PWD/.cache/deploy/bin
mkdir -p "$bin"
# The module version each binary was built from.
built() { go version -m "$bin/$1" 2>/dev/null | awk '$1 == "mod" { print $3 }'; }
if [[ $(built helm) != "$HELM_VERSION" ]]; then
	echo "install-tools: helm $HELM_VERSION" >&2
	GOBIN=$bin go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
if [[ $(built kustomize) != "$KUSTOMIZE_VERSION" ]]; then
	echo "install-tools: kustomize $KUSTOMIZE_VERSION" >&2
	GOBIN=$bin go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
fi
if [[ ${1:-} == --go-only ]]; then
	exit 0
fi
if ! command -v npm >/dev/null; then
	echo "install-tools: npm not found: apt-get install npm" >&2
	exit 1
fi
if [[ ! -d dashboards/test/node_modules/@grafana/schema ]]; then
	echo "install-tools: npm ci in dashboards/test" >&2
	(cd dashboards/test && npm ci --no-audit --no-fund --loglevel=error)
fi
