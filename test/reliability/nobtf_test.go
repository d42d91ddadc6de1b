package reliability

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// defaultProbes are the probes that run without further configuration.
var defaultProbes = []string{"syscall", "runqlat", "tcpretrans"}

// TestKernelWithoutBTF simulates kernels whose BTF CO-RE cannot use, by
// running ktel in a private mount namespace (unshare -m) where the kernel's
// BTF is hidden or unreadable; the host's mounts are not touched. `ktel
// check` must give every probe a verdict and exit 1; the daemon must still
// serve, with ktel_probe_up 0 for each probe and nothing attached.
func TestKernelWithoutBTF(t *testing.T) {
	testenv.Privileged(t)
	empty := filepath.Join(t.TempDir(), "empty")
	writeFile(t, empty, "")
	tests := []struct {
		name string
		// mounts is shell run in the new mount namespace before ktel.
		mounts  string
		verdict string
	}{
		{
			// No /sys/kernel/btf (CONFIG_DEBUG_INFO_BTF=n), and none of the
			// places cilium/ebpf falls back to holds a vmlinux either.
			name: "missing",
			mounts: `mount -t tmpfs -o size=4k ktel-nobtf /sys/kernel/btf
for d in /boot /lib/modules /usr/lib/modules /usr/lib/debug; do
	if [ -d "$d" ]; then mount -t tmpfs -o size=4k ktel-nobtf "$d"; fi
done`,
			verdict: "unsupported on this kernel",
		},
		{
			// /sys/kernel/btf/vmlinux is there but empty.
			name:    "corrupt",
			mounts:  "mount --bind " + empty + " /sys/kernel/btf/vmlinux",
			verdict: "failed",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testenv.Privileged(t)
			argv := []string{"unshare", "-m", "--propagation", "private", "sh", "-ec", tt.mounts + "\nexec \"$@\"", "sh", binary(t)}

			code, stdout, stderr := runBinary(t, argv[0], append(argv[1:], "check"), []string{"KTEL_LOG_LEVEL=error"})
			t.Logf("ktel check: exit %d, stdout:\n%s", code, stdout)
			if code != 1 {
				t.Errorf("ktel check: exit %d, want 1\nstderr:\n%s", code, stderr)
			}
			for _, p := range defaultProbes {
				re := regexp.MustCompile(`(?m)^` + p + `: ` + regexp.QuoteMeta(tt.verdict) + `: `)
				if !re.MatchString(stdout) {
					t.Errorf("no verdict %q for %s", p+": "+tt.verdict+": ...", p)
				}
			}
			if strings.Contains(stdout, ": ok") {
				t.Errorf("a probe loaded without usable kernel BTF")
			}

			d := startDaemon(t, argv)
			m := d.metrics(t)
			for _, p := range defaultProbes {
				if v, ok := m.value("ktel_probe_up", "probe", p); !ok || v != 0 {
					t.Errorf("ktel_probe_up{probe=%q} = %v (present %v), want 0", p, v, ok)
				}
			}
			if o := held(t, d.pid()); len(o.progs)+len(o.links) > 0 {
				t.Errorf("ktel holds BPF objects although no probe loaded: %v", o)
			}
			d.stopClean(t)
		})
	}
}
