#!/usr/bin/env bash
# Lists the packages make test-kernel runs in the guest: every package
# whose tests are privileged (testenv.Privileged or testenv.Enabled) or
# start a Kubernetes control plane (kubetest), as ./path relative to the
# module, but test/deploy, which tests what ships outside the binary with
# the Go toolchain, systemd-analyze, helm, kustomize and Prometheus, none
# of it kernel-dependent (make test runs it; the guest checks the
# capabilities it grants itself, see hack/kernel/init). A package that
# gets privileged tests runs in the guest without a change here.
set -euo pipefail
cd "$(dirname "$0")/../.."
go list -f '{{.Dir}}{{range .TestGoFiles}} {{.}}{{end}}{{range .XTestGoFiles}} {{.}}{{end}}' ./... |
	while read -r dir files; do
		[[ -n $files ]] || continue
		rel=./${dir#"$PWD"/}
		[[ $rel != ./test/deploy ]] || continue
		if (cd "$dir" && grep -qE 'testenv\.(Privileged|Enabled)\(|kubetest\.(Gate|Start|StartWith|Shared)\(' $files); then
			echo "$rel"
		fi
	done
