#!/usr/bin/env bash
# Runs ktel on Debian 12's stock kernel (linux-image-cloud-amd64, 6.1) under
# qemu in software emulation: `ktel check`, a serve with a scrape, and the
# privileged tests of the packages given as arguments (import paths
# relative to the module, e.g. ./bpf/netdev). See `make test-kernel`.
#
# Nothing is installed on the host but qemu and kmod (scripts/install-deps.sh):
# the kernel and busybox are Debian packages fetched with apt-get download
# and unpacked into the git-ignored .cache/kernel/. The guest boots an
# initramfs holding busybox, the static ktel, the tests compiled with
# `go test -c`, iproute2, iptables (nft), kmod, bash, coreutils' timeout,
# promtool, setpriv and bpftool with their libraries, the OpenTelemetry Collector and the Kubernetes control
# plane (.cache/otelcol, .cache/kube) when a package needs them, and the
# kernel's modules; hack/kernel/init runs it all and powers off.
#
# Environment: KTEL_BINARY (static ktel, default bin/ktel), KERNEL_TIMEOUT
# (each guest's whole boot, default 40m; a guest's share takes about 13
# minutes),
# KERNEL_MEMORY (the guest's, default 6G: the initramfs alone unpacks to
# about 0.8 GiB), KERNEL_RUN
# (a -test.run pattern: only those tests, verbose, and no check or scrape),
# KERNEL_SKIP (a -test.skip pattern, without spaces: tests not run at all),
# KERNEL_ACCEL (default tcg,thread=single: qemu's multi-threaded TCG froze
# 6.1 guests while patching static branches), KERNEL_GUESTS (default 2:
# guests booted side by side from the same initramfs, each running a share
# of the packages; single-threaded TCG keeps one host CPU busy per guest,
# so two guests halve the wall time on a 2-CPU host; the first guest also
# runs the check and the scrapes).
set -euo pipefail
cd "$(dirname "$0")/../.."

pkgs=("$@")
((${#pkgs[@]})) || { echo "usage: $0 ./pkg..." >&2; exit 2; }

ktel=${KTEL_BINARY:-bin/ktel}
cache=$PWD/.cache/kernel
timeout=${KERNEL_TIMEOUT:-40m}
accel=${KERNEL_ACCEL:-tcg,thread=single}
guests=${KERNEL_GUESTS:-2}
((guests >= 1)) || { echo "test-kernel: KERNEL_GUESTS=$guests: want 1 or more" >&2; exit 2; }
((guests <= ${#pkgs[@]})) || guests=${#pkgs[@]}
start=$SECONDS

step() { printf '== test-kernel: %s (%ds)\n' "$*" $((SECONDS - start)); }

# --- Debian packages: the kernel the cloud meta-package points at today
# (its name carries an ABI number that changes), and busybox.
image=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}') || true
if [[ -z $image ]]; then
	apt-get update -qq
	image=$(apt-cache depends linux-image-cloud-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
fi
[[ -n $image ]] || { echo "test-kernel: no kernel package behind linux-image-cloud-amd64" >&2; exit 1; }
kver=${image#linux-image-}

mkdir -p "$cache/debs"
for p in "$image" busybox-static; do
	if ! compgen -G "$cache/debs/${p}_*.deb" >/dev/null; then
		step "apt-get download $p"
		# _apt cannot write into a root-owned directory; download as root.
		(cd "$cache/debs" && apt-get download -o APT::Sandbox::User=root "$p")
	fi
done
pkgroot=$cache/pkgs/$kver
if [[ ! -e $pkgroot/.done ]]; then
	step "unpack $image and busybox-static"
	rm -rf "$pkgroot" && mkdir -p "$pkgroot"
	for d in "$cache"/debs/"${image}"_*.deb "$cache"/debs/busybox-static_*.deb; do
		dpkg-deb -x "$d" "$pkgroot"
	done
	touch "$pkgroot/.done"
fi
kernel=$pkgroot/boot/vmlinuz-$kver

# --- Test binaries, each with its package's testdata and run in its
# directory under /src, as go test runs it.
root=$cache/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,var,root,src,tests}
ln -s ../run "$root/var/run"
# The kernel loads modules on demand with /sbin/modprobe.
ln -s usr/sbin "$root/sbin"
step "go test -c ${pkgs[*]}"
: >"$root/tests/list"
for p in "${pkgs[@]}"; do
	rel=${p#./}
	# Named as go test names it: tests may look for their own name.
	bin=tests/$rel/$(basename "$rel").test
	CGO_ENABLED=0 go test -c -ldflags='-s -w' -o "$root/$bin" "./$rel"
	mkdir -p "$root/src/$rel"
	if [[ -d $rel/testdata ]]; then cp -a "$rel/testdata" "$root/src/$rel/"; fi
	echo "$rel /$bin" >>"$root/tests/list"
done
cp README.md "$root/src/"
install -m 755 "$ktel" "$root/bin/ktel"

# --- What the end-to-end tests run, found through the variables
# hack/kernel/init sets: the OpenTelemetry Collector (make otelcol,
# KTEL_OTELCOL), the Kubernetes control plane (make kube, KTEL_KUBE_BIN) and
# the prebuilt ktel (KTEL_TEST_BINARY) instead of a go build. Copied only
# when the tests of a package import otelcoltest or kubetest.
need_otelcol=0 need_kube=0
for p in "${pkgs[@]}"; do
	if grep -qs 'internal/otelcoltest"' "${p#./}"/*_test.go; then need_otelcol=1; fi
	if grep -qs 'internal/kubetest"' "${p#./}"/*_test.go; then need_kube=1; fi
done
if ((need_otelcol)); then
	[[ -x .cache/otelcol/otelcol-ktel ]] || { echo "test-kernel: no .cache/otelcol/otelcol-ktel: run make otelcol" >&2; exit 1; }
	mkdir -p "$root/opt/otelcol"
	cp .cache/otelcol/otelcol-ktel "$root/opt/otelcol/"
fi
if ((need_kube)); then
	for b in etcd kube-apiserver kube-controller-manager kubectl; do
		[[ -x .cache/kube/bin/$b ]] || { echo "test-kernel: no .cache/kube/bin/$b: run make kube" >&2; exit 1; }
	done
	mkdir -p "$root/opt/kube/bin"
	cp .cache/kube/bin/* "$root/opt/kube/bin/"
fi

# --- busybox, iproute2, iptables (nft), kmod, bash and coreutils' timeout
# (tests connect with bash's /dev/tcp under timeout) from this Debian 12 host,
# with their shared libraries; the xtables extensions are loaded with
# dlopen, so ldd does not see them.
cp "$pkgroot/bin/busybox" "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
	[[ -e $root/bin/$a ]] || ln -s busybox "$root/bin/$a"
done
# promtool (cmd/ktel checks a scrape with it), setpriv (cmd/ktel runs
# ktel unprivileged with it) and bpftool (cmd/ktel checks that nothing
# stays attached to a cgroup) too.
tools=(/usr/sbin/ip /usr/sbin/tc /usr/sbin/xtables-nft-multi /usr/bin/kmod /usr/bin/bash /usr/bin/timeout /usr/bin/promtool /usr/bin/setpriv /usr/sbin/bpftool)
xt=/usr/lib/x86_64-linux-gnu/xtables
for t in "${tools[@]}"; do
	[[ -x $t ]] || { echo "test-kernel: $t missing: run scripts/install-deps.sh" >&2; exit 1; }
done
libs=$(ldd "${tools[@]}" "$xt"/*.so | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u)
for f in "${tools[@]}" $libs "$xt"/*.so; do
	mkdir -p "$root$(dirname "$f")"
	cp -L "$f" "$root$f"
done
# The guest's PATH puts /usr/sbin before busybox's /bin.
for n in iptables ip6tables; do ln -s xtables-nft-multi "$root/usr/sbin/$n"; done
for n in modprobe depmod insmod lsmod rmmod; do ln -s ../bin/kmod "$root/usr/sbin/$n"; done
cp /etc/protocols /etc/services "$root/etc/"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"

# --- Modules the tests and the probes need, with what they depend on.
# inet_diag and udp_diag: lb closes UDP sockets through sock_diag before 6.5;
# bridge: podnet's tests wire a bridge plugin's pod.
mods=(veth bridge sch_ingress cls_bpf nf_tables nft_compat inet_diag udp_diag)
mkdir -p "$root/lib/modules/$kver"
cp "$pkgroot/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$pkgroot" "$kver"
need=$(for m in "${mods[@]}"; do modprobe -d "$pkgroot" -S "$kver" --show-depends "$m"; done | awk '$1 == "insmod" {print $2}' | sort -u)
for f in $need; do
	rel=${f#"$pkgroot"}
	mkdir -p "$root$(dirname "$rel")"
	cp "$f" "$root$rel"
done
depmod -b "$root" "$kver"
echo "${mods[*]}" >"$root/etc/ktel-modules"

cp hack/kernel/init "$root/init"
chmod 755 "$root/init"

step "initramfs"
# Not compressed: the emulated guest took 20 s more to inflate it than to
# copy it, and compressing took the host half a minute.
rm -f "$cache/initramfs.cpio.gz"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | "$pkgroot/bin/busybox" cpio -o -H newc -0 2>/dev/null) >"$cache/initramfs.cpio"
ls -l --block-size=M "$cache/initramfs.cpio" | awk '{print "== test-kernel: initramfs " $5}'

# --- Shares: the packages, longest first, each to the guest with the
# least work so far. Seconds each took in a 6.1 guest (make test-kernel,
# December 2026); a package not listed counts as 30.
weight() {
	case $1 in
	cmd/ktel) echo 490 ;; internal/k8smeta) echo 257 ;; test/reliability) echo 256 ;;
	internal/daemon) echo 177 ;; bpf/lb) echo 164 ;; bpf/runqlat) echo 42 ;;
	*) echo 30 ;;
	esac
}
declare -a share load
for ((g = 0; g < guests; g++)); do share[g]="" load[g]=0; done
while read -r w rel; do
	g=0
	for ((i = 1; i < guests; i++)); do ((load[i] < load[g])) && g=$i; done
	share[g]+=${share[g]:+,}$rel
	load[g]=$((load[g] + w))
done < <(for p in "${pkgs[@]}"; do rel=${p#./}; echo "$(weight "$rel") $rel"; done | sort -rn)

# --- Boot. Each guest prints one "ktel-kernel:" line per step and a final
# "ktel-kernel: PASS" or "ktel-kernel: FAIL ...", which is read from its
# console log.
rm -f "$cache"/console*.log
declare -a pids logs rcs
tailer=
# On any exit (an error, SIGINT, SIGTERM) no guest or tail outlives this
# script: background jobs of a script ignore SIGINT, and a TERM to the
# script alone reaches none of them. timeout passes the TERM on to qemu.
stop_guests() {
	local p
	for p in "${pids[@]}" $tailer; do kill "$p" 2>/dev/null || true; done
}
trap stop_guests EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for ((g = 0; g < guests; g++)); do
	logs[g]=$cache/console-$g.log
	step "boot $kver under qemu ($accel), guest $g: ${share[g]} (about ${load[g]} s)"
	cmdline="console=ttyS0 panic=-1 loglevel=4 ktel.run=${KERNEL_RUN:-} ktel.skip=${KERNEL_SKIP:-} ktel.pkgs=${share[g]} ktel.checks=$((g == 0))"
	timeout --foreground -k 10s "$timeout" qemu-system-x86_64 -accel "$accel" -cpu max -smp 2 -m "${KERNEL_MEMORY:-6G}" \
		-nographic -no-reboot -kernel "$kernel" -initrd "$cache/initramfs.cpio" \
		-append "$cmdline" </dev/null >"${logs[g]}" 2>&1 &
	pids[g]=$!
done
# The guests' consoles as they come (tail names the log before each
# guest's lines).
tail -n +1 -F "${logs[@]}" 2>/dev/null &
tailer=$!
for ((g = 0; g < guests; g++)); do
	rcs[g]=0
	wait "${pids[g]}" || rcs[g]=$?
done
pids=()
kill "$tailer" 2>/dev/null || true
wait "$tailer" 2>/dev/null || true
tailer=

failed=0
for ((g = 0; g < guests; g++)); do
	rc=${rcs[g]}
	step "guest $g: qemu exited with status $rc"
	if ((rc == 124)); then
		echo "test-kernel: FAIL: guest $g did not finish within $timeout (${logs[g]})" >&2
		failed=1
		continue
	fi
	# The last verdict line is the summary when the guest got that far.
	# (|| true: under pipefail a log without one would end the script here.)
	result=$(grep -ao 'ktel-kernel: \(PASS\|FAIL.*\)' "${logs[g]}" | tail -1 | tr -d '\r') || true
	case $result in
	"ktel-kernel: PASS") echo "test-kernel: guest $g PASS on $kver (${share[g]})" ;;
	"") echo "test-kernel: FAIL: no result line in ${logs[g]}" >&2; failed=1 ;;
	*) echo "test-kernel: guest $g $result (${logs[g]})" >&2; failed=1 ;;
	esac
done
((failed == 0)) || exit 1
echo "test-kernel: PASS on $kver ($((SECONDS - start)) s; logs in $cache/console-*.log)"
