#!/usr/bin/env bash
# Builds the Kubernetes control plane that ktel's tests run (internal/kubetest):
# etcd, kube-apiserver, kube-controller-manager and kubectl at pinned versions,
# and kube-proxy from the same release for the load balancer's benchmark
# (make bench-kube), into .cache/kube/bin (git-ignored). Idempotent: does nothing when the
# binaries exist and were built from the same versions and this script.
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, client-go, ...)
# at v0.0.0 and replaces them with ./staging paths, so `go install
# k8s.io/kubernetes/cmd/...@v1.37.2` refuses it. A small wrapper module under
# .cache/kube/k8s requires k8s.io/kubernetes and replaces each of those
# modules with the published v0.37.x release instead. etcd builds in a wrapper
# of its own (.cache/kube/etcd) so that its dependencies cannot move
# kube-apiserver's. ktel's go.mod is never touched; everything comes from the
# Go module proxy.
#
# Cold on two cores: about 10 minutes idle, up to 30 loaded; the Go build
# cache grows by about 4 GB.
#
# Environment: FORCE=1 rebuilds; GO (default: go) picks the toolchain.
set -euo pipefail

KUBE_VERSION=v1.37.2
KUBE_STAGING_VERSION=v0.37.2
ETCD_VERSION=v3.7.4

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
cache=.cache
out=$cache/kube
bin=$out/bin
stamp=$out/.stamp

GO=${GO:-go}
export GOTOOLCHAIN=local GOWORK=off GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0

# Bump when the way the binaries are built changes.
RECIPE=3
want="kube $KUBE_VERSION $KUBE_STAGING_VERSION etcd $ETCD_VERSION $("$GO" env GOVERSION) recipe $RECIPE"
mkdir -p "$out"
exec 9>"$cache/kube.lock"
flock 9
tools=(etcd kube-apiserver kube-controller-manager kubectl kube-proxy)
uptodate() {
	[[ -f $stamp && $(<"$stamp") == "$want" ]] || return 1
	local t
	for t in "${tools[@]}"; do [[ -x $bin/$t ]] || return 1; done
}
if [[ ${FORCE:-} != 1 ]] && uptodate; then
	echo "kube: $bin is up to date" >&2
	exit 0
fi
rm -f "$stamp"
start=$SECONDS
mkdir -p "$bin"

# Wrapper for Kubernetes: one file importing the commands keeps `go mod tidy`
# from dropping the requirement.
k8s=$out/k8s
rm -rf "$k8s"
mkdir -p "$k8s"
cat >"$k8s/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
(
	cd "$k8s"
	"$GO" mod init ktel.local/kube >/dev/null 2>&1
	"$GO" mod edit -require="k8s.io/kubernetes@$KUBE_VERSION"
	# The staging modules k8s.io/kubernetes requires at v0.0.0.
	kmod=$("$GO" mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
	[[ -f $kmod ]] || { echo "kube: no go.mod for k8s.io/kubernetes@$KUBE_VERSION" >&2; exit 1; }
	n=0
	for m in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1} $1 == "require" && $2 ~ /^k8s\.io\// && $3 == "v0.0.0" {print $2}' "$kmod" | sort -u); do
		"$GO" mod edit -replace="$m=$m@$KUBE_STAGING_VERSION"
		n=$((n + 1))
	done
	echo "kube: replacing $n staging modules with $KUBE_STAGING_VERSION" >&2
	"$GO" mod tidy 2>&1 | grep -v '^go: downloading' >&2 || true
	# The version Kubernetes' own build stamps (hack/lib/version.sh);
	# without it the binaries call themselves v0.0.0-master.
	minor=${KUBE_VERSION#v1.}
	minor=${minor%%.*}
	ldflags="-s -w"
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
	done
	for t in kube-apiserver kube-controller-manager kubectl kube-proxy; do
		echo "kube: compiling $t" >&2
		"$GO" build -trimpath -ldflags="$ldflags" -o "../bin/$t" "k8s.io/kubernetes/cmd/$t"
	done
)

etcd=$out/etcd
rm -rf "$etcd"
mkdir -p "$etcd"
cat >"$etcd/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
(
	cd "$etcd"
	"$GO" mod init ktel.local/etcd >/dev/null 2>&1
	"$GO" mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
	"$GO" mod tidy 2>&1 | grep -v '^go: downloading' >&2 || true
	echo "kube: compiling etcd" >&2
	"$GO" build -trimpath -ldflags="-s -w" -o ../bin/etcd go.etcd.io/etcd/server/v3
)

"$bin/etcd" --version >&2
"$bin/kube-apiserver" --version >&2
"$bin/kubectl" version --client >&2
"$bin/kube-proxy" --version >&2
echo "$want" >"$stamp"
echo "kube: built $bin in $((SECONDS - start))s" >&2
