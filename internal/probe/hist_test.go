package probe

import (
	"encoding/binary"
	"slices"
	"testing"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// SumHist adds up the per-CPU copies of a histogram value as
// LookupBytes returns them (per CPU: the slots, then the sum), and hands
// each CPU's copy to perCPU unchanged.
func TestSumHist(t *testing.T) {
	layout, err := histogram.NewLayout(1)
	if err != nil {
		t.Fatal(err)
	}
	const ncpu = 3
	n := layout.Slots()
	size := HistValueSize(layout)
	if size != 8*(n+1) {
		t.Fatalf("value size %d, want %d: the slots and the sum", size, 8*(n+1))
	}
	// CPU c counts c*1000+k in slot k, and c+1 seconds of sum.
	want := make([][]uint64, ncpu)
	var buf []byte
	for c := range ncpu {
		want[c] = make([]uint64, n)
		for k := range n {
			want[c][k] = uint64(c*1000 + k)
			buf = binary.NativeEndian.AppendUint64(buf, want[c][k])
		}
		buf = binary.NativeEndian.AppendUint64(buf, uint64(c+1)*1e9)
	}

	got := make([][]uint64, ncpu)
	gotSum := make([]uint64, ncpu)
	slots, sum := SumHist(buf, ncpu, layout, func(cpu int, s []uint64, sumNs uint64) {
		got[cpu], gotSum[cpu] = s, sumNs
	})
	for c := range ncpu {
		if !slices.Equal(got[c], want[c]) || gotSum[c] != uint64(c+1)*1e9 {
			t.Errorf("CPU %d: %v sum %d, want %v sum %d", c, got[c], gotSum[c], want[c], uint64(c+1)*1e9)
		}
	}
	for k := range n {
		if w := uint64(3*k + 3000); slots[k] != w {
			t.Errorf("slot %d = %d, want %d", k, slots[k], w)
		}
	}
	if sum != 6e9 {
		t.Errorf("sum %d, want 6e9", sum)
	}

	// Without perCPU, the same total.
	slots2, sum2 := SumHist(buf, ncpu, layout, nil)
	if !slices.Equal(slots2, slots) || sum2 != sum {
		t.Errorf("without perCPU: %v %d, want %v %d", slots2, sum2, slots, sum)
	}
	// One CPU: its copy is the total.
	slots1, sum1 := SumHist(buf, 1, layout, nil)
	if !slices.Equal(slots1, want[0]) || sum1 != 1e9 {
		t.Errorf("one CPU: %v %d", slots1, sum1)
	}
}
