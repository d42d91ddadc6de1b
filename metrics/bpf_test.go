package metrics

import (
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// countKeys counts the entries of every kind of bounded map ktel has,
// empty, with one entry, with more than one batch, and full, with key and
// value sizes that are not multiples of eight.
func TestCountKeys(t *testing.T) {
	testenv.Privileged(t)
	ncpu := testenv.PossibleCPUs(t)
	for _, typ := range []ebpf.MapType{ebpf.Hash, ebpf.PerCPUHash, ebpf.LRUHash, ebpf.LRUCPUHash} {
		for _, n := range []int{0, 1, countBatch + 77, 4096} {
			t.Run(fmt.Sprintf("%s/%d", typ, n), func(t *testing.T) {
				m := testenv.NewMap(t, &ebpf.MapSpec{Type: typ, KeySize: 6, ValueSize: 12, MaxEntries: 4096})
				var val any = make([]byte, 12)
				if typ == ebpf.PerCPUHash || typ == ebpf.LRUCPUHash {
					val = make([][12]byte, ncpu)
				}
				for i := range n {
					key := make([]byte, 6)
					binary.LittleEndian.PutUint32(key, uint32(i))
					if err := m.Update(key, val, ebpf.UpdateNoExist); err != nil {
						t.Fatalf("insert %d: %v", i, err)
					}
				}
				want := n
				if typ == ebpf.LRUHash || typ == ebpf.LRUCPUHash {
					// An LRU map may evict before it is full: count by walking.
					want = walk(t, m)
					if want < n/2 {
						t.Fatalf("%d of %d entries left", want, n)
					}
				}
				got, err := countKeys(m)
				if err != nil || got != want {
					t.Errorf("countKeys = %d, %v; want %d", got, err, want)
				}
			})
		}
	}
}

// walk counts m's keys one by one.
func walk(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	var (
		n   int
		cur any
		key = make([]byte, m.KeySize())
	)
	for {
		var next []byte
		if err := m.NextKey(cur, &next); errors.Is(err, ebpf.ErrKeyNotExist) {
			return n
		} else if err != nil {
			t.Fatal(err)
		}
		n++
		copy(key, next)
		cur = key
	}
}
