#!/usr/bin/env bash
# Soak test (make soak; not run in CI). Runs ktel with the default probes
# plus netdev on a veth pair between two test network namespaces, under a
# bounded syscall, context-switch, packet and scrape load, for a while
# (default 30m), sampling ktel's RSS, open file descriptors, threads and
# goroutines (go_goroutines from /metrics) every 10 s into a CSV. At the end
# it prints a least-squares slope per series: flat means no growth beyond
# noise.
#
# Usage (as root): hack/soak.sh [DURATION]      DURATION: 300, 300s, 5m, 1h
# Environment:
#   SOAK_DURATION  default 30m (the argument wins)
#   SOAK_INTERVAL  seconds between samples, default 10
#   SOAK_WARMUP    seconds left out of the fit (heap and caches settling), default 60
#   SOAK_CSV       output file, default /tmp/ktel-soak-<time>.csv
#   SOAK_ADDR      ktel's listen address, default 127.0.0.1:19439
#   SOAK_BINARY    binary to run; default: built from this tree
#
# Traffic stays on loopback and inside the namespaces this script creates
# and deletes. Exit status: 0 if ktel ran throughout and stopped cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

to_seconds() {
	local v=$1
	case $v in
	*h) echo $((${v%h} * 3600)) ;;
	*m) echo $((${v%m} * 60)) ;;
	*s) echo "${v%s}" ;;
	*) echo "$v" ;;
	esac
}

duration=$(to_seconds "${1:-${SOAK_DURATION:-30m}}")
interval=${SOAK_INTERVAL:-10}
warmup=${SOAK_WARMUP:-60}
csv=${SOAK_CSV:-/tmp/ktel-soak-$(date +%Y%m%d-%H%M%S).csv}
addr=${SOAK_ADDR:-127.0.0.1:19439}
ns=ktel-soak-$$

[ "$(id -u)" = 0 ] || { echo "soak: run as root" >&2; exit 1; }

work=$(mktemp -d /tmp/ktel-soak.XXXXXX)
bin=${SOAK_BINARY:-}
if [ -z "$bin" ]; then
	echo "soak: building ktel"
	CGO_ENABLED=0 go build -buildvcs=false -o "$work/ktel" ./cmd/ktel
	bin=$work/ktel
fi

pids=()
ktel_pid=
cleanup() {
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	if [ -n "$ktel_pid" ] && kill -0 "$ktel_pid" 2>/dev/null; then
		kill -KILL "$ktel_pid"
		wait "$ktel_pid" 2>/dev/null
	fi
	ip netns del "$ns-a" 2>/dev/null
	ip netns del "$ns-b" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Two namespaces joined by a veth pair; ktel counts packets on the end in
# $ns-a (tcx, so nothing stays behind if ktel dies).
ip netns add "$ns-a"
ip netns add "$ns-b"
ip -n "$ns-a" link add ksoak0 type veth peer name ksoak1 netns "$ns-b"
ip -n "$ns-a" addr add 10.207.0.1/24 dev ksoak0
ip -n "$ns-b" addr add 10.207.0.2/24 dev ksoak1
ip -n "$ns-a" link set ksoak0 up
ip -n "$ns-b" link set ksoak1 up

# Only the configuration below: none of the caller's KTEL_* variables.
unset_ktel=()
for v in $(compgen -e); do
	case $v in KTEL_*) unset_ktel+=(-u "$v") ;; esac
done
env "${unset_ktel[@]}" KTEL_LISTEN_ADDRESS="$addr" KTEL_LOG_LEVEL=warn \
	KTEL_INTERFACES='ksoak*' KTEL_NETDEV_NETNS="/var/run/netns/$ns-a" KTEL_NETDEV_TC_MODE=tcx \
	"$bin" 2>"$work/ktel.log" &
ktel_pid=$!
for _ in $(seq 100); do
	curl -sf "http://$addr/healthz" >/dev/null && break
	kill -0 "$ktel_pid" 2>/dev/null || { cat "$work/ktel.log" >&2; echo "soak: ktel exited" >&2; exit 1; }
	sleep 0.1
done
curl -sf "http://$addr/healthz" >/dev/null || { echo "soak: ktel not healthy" >&2; exit 1; }

# Load, each bounded in rate.
# Syscalls: about 40k small read/write pairs a second.
( while :; do dd if=/dev/zero of=/dev/null bs=64 count=10000 status=none; sleep 0.25; done ) &
pids+=($!)
# Context switches: a writer and a reader passing small chunks through a pipe.
( while :; do head -c 4M /dev/zero | cat >/dev/null; sleep 0.25; done ) &
pids+=($!)
# Packets: about 200 UDP datagrams a second across the veth (bash's
# /dev/udp, nothing to install), plus the scrapes' TCP on loopback.
ip netns exec "$ns-a" bash -c 'while :; do for _ in {1..20}; do echo soak >/dev/udp/10.207.0.2/9; done; sleep 0.1; done' 2>/dev/null &
pids+=($!)
# Scrapes: one a second, alternating text and protobuf, as a Prometheus
# with a short interval would.
(
	while :; do
		curl -sf -o /dev/null "http://$addr/metrics"
		curl -sf -o /dev/null -H 'Accept: application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited' "http://$addr/metrics"
		sleep 1
	done
) &
pids+=($!)

echo "seconds,rss_kib,fds,threads,goroutines,heap_bytes" >"$csv"
echo "soak: ktel pid $ktel_pid on $addr for ${duration}s, sampling every ${interval}s into $csv"
start=$(date +%s)
next=$start
while :; do
	now=$(date +%s)
	kill -0 "$ktel_pid" 2>/dev/null || { echo "soak: ktel died" >&2; cat "$work/ktel.log" >&2; exit 1; }
	rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$ktel_pid/status")
	threads=$(awk '/^Threads:/ {print $2}' "/proc/$ktel_pid/status")
	fds=$(find "/proc/$ktel_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
	m=$(curl -sf "http://$addr/metrics" || true)
	gor=$(awk '$1 == "go_goroutines" {print $2}' <<<"$m")
	heap=$(awk '$1 == "go_memstats_heap_inuse_bytes" {printf "%d", $2}' <<<"$m")
	[ -n "$gor" ] || { echo "soak: scrape failed at $((now - start))s" >&2; gor=NA; }
	echo "$((now - start)),$rss,$fds,$threads,$gor,${heap:-NA}" >>"$csv"
	[ $((now - start)) -ge "$duration" ] && break
	next=$((next + interval))
	# In the background, so that INT/TERM are handled at once.
	sleep $((next - $(date +%s) > 0 ? next - $(date +%s) : 0)) &
	wait $!
done
final=$(curl -sf "http://$addr/metrics" || true)

for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
kill -TERM "$ktel_pid"
status=0
wait "$ktel_pid" || status=$?
ktel_pid=
if [ "$status" != 0 ]; then
	echo "soak: ktel exited with status $status after SIGTERM" >&2
fi
if [ -s "$work/ktel.log" ]; then
	echo "soak: ktel logged (warn and above):"
	sed 's/^/  /' "$work/ktel.log"
fi

echo "soak: ktel counted $(awk '$1 ~ /^ktel_net_packets_total/ {s += $2} END {printf "%d", s}' <<<"$final") packets on ksoak0 and $(awk '$1 ~ /^ktel_syscall_latency_seconds_count/ {s += $2} END {printf "%d", s}' <<<"$final") syscalls"

# Least-squares slope of each column against time, over the samples after
# the warm-up; growth = slope x fitted span, and as a share of the mean.
echo "soak: $(($(wc -l <"$csv") - 1)) samples; fit over t >= ${warmup}s"
awk -F, -v warmup="$warmup" '
NR == 1 { for (i = 2; i <= NF; i++) name[i] = $i; nf = NF; next }
$1 >= warmup {
	for (i = 2; i <= nf; i++) {
		if ($i == "NA") continue
		n[i]++; sx[i] += $1; sy[i] += $i; sxx[i] += $1 * $1; sxy[i] += $1 * $i
		if (!(i in lo) || $i < lo[i]) lo[i] = $i
		if (!(i in hi) || $i > hi[i]) hi[i] = $i
		if (!(i in first)) first[i] = $i
		last[i] = $i
	}
	t0 = (t0 == "" ? $1 : t0); t1 = $1
}
END {
	printf "%-12s %12s %12s %12s %12s %14s %14s %9s\n", "series", "first", "last", "min", "max", "slope/hour", "fit growth", "of mean"
	for (i = 2; i <= nf; i++) {
		if (n[i] < 2) { printf "%-12s too few samples\n", name[i]; continue }
		d = n[i] * sxx[i] - sx[i] * sx[i]
		b = d ? (n[i] * sxy[i] - sx[i] * sy[i]) / d : 0
		mean = sy[i] / n[i]
		g = b * (t1 - t0)
		printf "%-12s %12d %12d %12d %12d %14.2f %14.2f %8.2f%%\n", name[i], first[i], last[i], lo[i], hi[i], b * 3600, g, mean ? 100 * g / mean : 0
	}
}' "$csv"
echo "soak: CSV in $csv"
exit "$status"
