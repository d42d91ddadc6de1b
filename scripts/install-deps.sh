#!/usr/bin/env bash
# Installs what building, testing and benchmarking ktel needs on Debian 12:
# clang-19 (pinned BPF compiler), libbpf-dev (bpf_helpers.h and the other
# libbpf headers the BPF programs include), kernel UAPI headers (syscall tables),
# bpftool, Prometheus (promtool and the server, for end-to-end tests),
# iptables and iproute2 (network-namespace tests), nftables (kube-proxy's
# nftables mode in make bench-kube), util-linux (setpriv) and
# systemd (systemd-analyze verify of the unit), redis-server and redis-tools
# (the application row of make bench), qemu and kmod (make test-kernel
# boots Debian's 6.1 kernel, which hack/kernel/run.sh fetches into
# .cache/kernel without installing it). The benchmarks install bpftrace,
# their point of comparison, themselves (and redis when it is missing). Idempotent and quick
# when everything is present.
set -euo pipefail

packages=(clang-19 llvm-19 libbpf-dev bpftool prometheus iptables nftables iproute2 curl util-linux
	systemd linux-libc-dev linux-libc-dev-arm64-cross redis-server redis-tools qemu-system-x86 kmod)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "install-deps: missing ${missing[*]}; run as root (sudo make ...)" >&2
		exit 1
	fi
	echo "install-deps: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# The Debian package starts a Prometheus server where it can; tests run
	# their own.
	# So does redis-server's; the benchmark runs its own.
	for svc in prometheus redis-server; do
		if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
			systemctl disable --now "$svc" >/dev/null 2>&1 || true
		fi
	done
fi

go mod download
