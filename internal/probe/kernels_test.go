package probe_test

import (
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/probe"
)

// since is the kernel release (major*100+minor) a storage needs in tracing
// programs.
var since = map[probe.Storage]int{
	"":                     508, // ktel's floor: 5.8 with BTF
	probe.StorageHash:      508,
	probe.StorageTask:      511,
	probe.StorageCPU:       511,
	probe.StorageSchedInfo: 514,
}

// Picks returns the variant probe.FirstLoading picks among the candidates for
// hook on a kernel of release rel, where a variant whose storage is newer
// is refused as unsupported.
func Picks(t *testing.T, variants []probe.Variant, hook probe.Hook, rel int) probe.Variant {
	t.Helper()
	cands, err := probe.Candidates(variants, hook, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, v, err := probe.FirstLoading(cands, slog.New(slog.NewTextHandler(io.Discard, nil)), func(v probe.Variant) (struct{}, error) {
		if rel < since[v.Storage] {
			return struct{}{}, fmt.Errorf("create map: %w", probe.ErrUnsupported)
		}
		return struct{}{}, nil
	})
	if err != nil {
		t.Fatalf("%s on %d: %v", hook, rel, err)
	}
	return v
}

// The variant each probe picks on each supported kernel (by release, and
// so by the storage it has): always tp_btf unless a hook is forced.
func TestKernelPicks(t *testing.T) {
	probes := map[string][]probe.Variant{"syscall": sysprobe.Variants, "runqlat": runqlat.Variants, "tcpretrans": tcpretrans.Variants}
	for _, tc := range []struct {
		probe string
		rel   int
		hook  probe.Hook
		want  string
	}{
		{"syscall", 508, probe.HookAuto, "tp_btf+hash"},
		{"syscall", 510, probe.HookAuto, "tp_btf+hash"},
		{"syscall", 511, probe.HookAuto, "tp_btf+cpu"},
		{"syscall", 601, probe.HookAuto, "tp_btf+cpu"}, // Debian 12
		{"syscall", 618, probe.HookAuto, "tp_btf+cpu"},
		{"syscall", 618, probe.HookRaw, "raw_tp+hash"},
		{"syscall", 508, probe.HookRaw, "raw_tp+hash"},
		{"syscall", 618, probe.HookTracepoint, "tracepoint+hash"},
		{"runqlat", 508, probe.HookAuto, "tp_btf+hash"},
		{"runqlat", 510, probe.HookAuto, "tp_btf+hash"},
		{"runqlat", 511, probe.HookAuto, "tp_btf+task"},
		{"runqlat", 513, probe.HookAuto, "tp_btf+task"},
		{"runqlat", 514, probe.HookAuto, "tp_btf+sched_info"},
		{"runqlat", 601, probe.HookAuto, "tp_btf+sched_info"},
		{"runqlat", 618, probe.HookAuto, "tp_btf+sched_info"},
		{"runqlat", 618, probe.HookRaw, "raw_tp+hash"},
		{"runqlat", 601, probe.HookTracepoint, "tracepoint+hash"},
		{"tcpretrans", 508, probe.HookAuto, "tp_btf"},
		{"tcpretrans", 618, probe.HookAuto, "tp_btf"},
	} {
		if got := Picks(t, probes[tc.probe], tc.hook, tc.rel).String(); got != tc.want {
			t.Errorf("%s, %s on %d.%d: %s, want %s", tc.probe, tc.hook, tc.rel/100, tc.rel%100, got, tc.want)
		}
	}
	// Every variant is picked somewhere: none is dead code.
	picked := map[string]bool{}
	for name, vs := range probes {
		for _, hook := range []probe.Hook{probe.HookAuto, probe.HookRaw, probe.HookTracepoint} {
			for rel := 508; rel <= 618; rel++ {
				if _, err := probe.Candidates(vs, hook, nil); err == nil {
					picked[name+" "+Picks(t, vs, hook, rel).String()] = true
				}
			}
		}
		for _, v := range vs {
			if !picked[name+" "+v.String()] {
				t.Errorf("%s: variant %s is picked on no supported kernel", name, v)
			}
		}
	}
}
