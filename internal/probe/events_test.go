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
