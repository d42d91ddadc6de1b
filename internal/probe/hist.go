package probe

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// histSpecs are the variables of ktel_hist.h.
type histSpecs struct {
	Bounds *ebpf.VariableSpec `ebpf:"ktel_bounds"`
	Slots  *ebpf.VariableSpec `ebpf:"ktel_slots"`
}

// SetHistogram writes the slot bounds of layout into the program's
// read-only data (ktel_bounds, ktel_slots in ktel_hist.h) and sizes the
// values of hist, the histogram map of spec: the slots, then the sum.
func SetHistogram(spec *ebpf.CollectionSpec, layout *histogram.Layout, hist *ebpf.MapSpec) error {
	var s histSpecs
	if err := spec.Assign(&s); err != nil {
		return fmt.Errorf("histogram variables: %w", err)
	}
	if err := s.Bounds.Set(layout.KernelTable()); err != nil {
		return fmt.Errorf("set ktel_bounds: %w", err)
	}
	if err := s.Slots.Set(uint32(layout.Slots())); err != nil {
		return fmt.Errorf("set ktel_slots: %w", err)
	}
	hist.ValueSize = uint32(HistValueSize(layout))
	return nil
}

// HistValueSize is the size of one histogram value in bytes.
func HistValueSize(layout *histogram.Layout) int { return 8 * (layout.Slots() + 1) }

// SumHist reads the histogram value of one key from a per-CPU map read
// with LookupBytes: per CPU, the slots then the sum. perCPU receives each
// CPU's copy (nil to skip); the total is returned.
func SumHist(buf []byte, ncpu int, layout *histogram.Layout, perCPU func(cpu int, slots []uint64, sumNs uint64)) (slots []uint64, sumNs uint64) {
	n := layout.Slots()
	size := HistValueSize(layout)
	stride := (size + 7) &^ 7
	slots = make([]uint64, n)
	for cpu := range ncpu {
		v := buf[cpu*stride : cpu*stride+size]
		var mine []uint64 // only when the caller wants each CPU's copy
		if perCPU != nil {
			mine = make([]uint64, n)
		}
		for k := range n {
			c := nativeEndian.Uint64(v[8*k:])
			slots[k] += c
			if mine != nil {
				mine[k] = c
			}
		}
		s := nativeEndian.Uint64(v[8*n:])
		sumNs += s
		if perCPU != nil {
			perCPU(cpu, mine, s)
		}
	}
	return slots, sumNs
}

var nativeEndian = binary.NativeEndian

// ReadHistHash reads a hash of histograms shared by all CPUs (one value
// per key: the slots, then the sum), as the per-cgroup maps hold them,
// and calls f for each key.
func ReadHistHash[K any](m *ebpf.Map, layout *histogram.Layout, f func(k K, slots []uint64, sumNs uint64)) error {
	n := layout.Slots()
	var k K
	buf := make([]byte, HistValueSize(layout))
	it := m.Iterate()
	for it.Next(&k, &buf) {
		slots := make([]uint64, n)
		for i := range n {
			slots[i] = nativeEndian.Uint64(buf[8*i:])
		}
		f(k, slots, nativeEndian.Uint64(buf[8*n:]))
	}
	return it.Err()
}
