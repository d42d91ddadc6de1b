package probe

import (
	"maps"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// SumPerCPUHash reads every entry, over several batches, with the sums the
// iterator computes.
func TestSumPerCPUHash(t *testing.T) {
	testenv.Privileged(t)
	ncpu := testenv.PossibleCPUs(t)
	m := testenv.NewMap(t, &ebpf.MapSpec{Type: ebpf.PerCPUHash, KeySize: 8, ValueSize: 8, MaxEntries: 3000})
	for k := range uint64(2500) {
		vals := make([]uint64, ncpu)
		for c := range vals {
			vals[c] = k + uint64(c)
		}
		if err := m.Put(k, vals); err != nil {
			t.Fatal(err)
		}
	}
	got, err := SumPerCPUHash[uint64](m, 3000)
	if err != nil {
		t.Fatal(err)
	}
	want, err := sumPerCPUHashIter[uint64](m)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2500 || !maps.Equal(got, want) {
		t.Fatalf("%d entries, iterator %d", len(got), len(want))
	}
	if s := got[7]; s != uint64(7*ncpu+ncpu*(ncpu-1)/2) {
		t.Errorf("key 7: sum %d", s)
	}
}

func TestCountCPUList(t *testing.T) {
	for in, want := range map[string]int{"0": 1, "0-3": 4, "0-3,6": 5, "0,2,4-5": 4} {
		if n, err := countCPUList(in); err != nil || n != want {
			t.Errorf("countCPUList(%q) = %d, %v; want %d", in, n, err, want)
		}
	}
	for _, in := range []string{"", "a", "3-1", "0-", "0,,1"} {
		if n, err := countCPUList(in); err == nil {
			t.Errorf("countCPUList(%q) = %d, want an error", in, n)
		}
	}
	if n, err := OnlineCPUs(); err != nil || n < 1 {
		t.Errorf("OnlineCPUs() = %d, %v", n, err)
	}
}
