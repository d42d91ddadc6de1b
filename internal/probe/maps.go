package probe

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// CString converts a NUL-terminated C char array (as bpf2go renders it) to
// a string.
func CString(c []int8) string {
	b := make([]byte, 0, len(c))
	for _, ch := range c {
		if ch == 0 {
			break
		}
		b = append(b, byte(ch))
	}
	return string(b)
}

// CBytes converts a NUL-terminated C char array in a record to a string.
func CBytes(c []byte) string {
	if i := bytes.IndexByte(c, 0); i >= 0 {
		c = c[:i]
	}
	return string(c)
}

// SumPerCPUArray returns, for each of the n keys of a per-CPU array of
// u64, the sum over CPUs: in one batch lookup where the kernel has them
// (5.6+), one lookup per key otherwise.
func SumPerCPUArray(m *ebpf.Map, n int) ([]uint64, error) {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, err
	}
	keys := make([]uint32, n)
	vals := make([]uint64, n*ncpu)
	sums := make([]uint64, n)
	var cursor ebpf.MapBatchCursor
	got, err := m.BatchLookup(&cursor, keys, vals, nil)
	switch {
	case got == n && (err == nil || errors.Is(err, ebpf.ErrKeyNotExist)):
		for i := range n {
			for _, v := range vals[i*ncpu : (i+1)*ncpu] {
				sums[i] += v
			}
		}
		return sums, nil
	case !errors.Is(err, ebpf.ErrNotSupported):
		return nil, fmt.Errorf("batch lookup: %d of %d values: %w", got, n, err)
	}
	var per []uint64
	for i := range uint32(n) {
		if err := m.Lookup(i, &per); err != nil {
			return nil, fmt.Errorf("lookup %d: %w", i, err)
		}
		for _, v := range per {
			sums[i] += v
		}
	}
	return sums, nil
}

// SumPerCPUHash returns the entries of a per-CPU hash of u64 values with
// at most maxEntries keys, each summed over CPUs: by batch lookups where
// the kernel has them (5.6+; two syscalls per key otherwise).
func SumPerCPUHash[K comparable](m *ebpf.Map, maxEntries int) (map[K]uint64, error) {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, err
	}
	out := make(map[K]uint64)
	n := min(maxEntries, 1024) // per call; a hash bucket must fit
	keys := make([]K, n)
	vals := make([]uint64, n*ncpu)
	var cursor ebpf.MapBatchCursor
	for {
		got, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range got {
			var n uint64
			for _, v := range vals[i*ncpu : (i+1)*ncpu] {
				n += v
			}
			out[keys[i]] = n
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return out, nil
		case errors.Is(err, ebpf.ErrNotSupported):
			return sumPerCPUHashIter[K](m)
		case err != nil:
			return nil, fmt.Errorf("batch lookup: %w", err)
		case got == 0:
			return out, nil
		}
	}
}

func sumPerCPUHashIter[K comparable](m *ebpf.Map) (map[K]uint64, error) {
	out := make(map[K]uint64)
	var (
		key  K
		vals []uint64
		iter = m.Iterate()
	)
	for iter.Next(&key, &vals) {
		var n uint64
		for _, v := range vals {
			n += v
		}
		out[key] = n
	}
	if err := iter.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// OnlineCPUs counts the CPUs online now, from
// /sys/devices/system/cpu/online ("0-3,6").
func OnlineCPUs() (int, error) {
	const file = "/sys/devices/system/cpu/online"
	b, err := os.ReadFile(file)
	if err != nil {
		return 0, fmt.Errorf("online CPUs: %w", err)
	}
	n, err := countCPUList(string(bytes.TrimSpace(b)))
	if err != nil {
		return 0, fmt.Errorf("online CPUs: %s: %w", file, err)
	}
	return n, nil
}

// countCPUList counts the CPUs of a kernel CPU list ("0-3,6").
func countCPUList(s string) (int, error) {
	n := 0
	for r := range strings.SplitSeq(s, ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("bad CPU list %q", s)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return 0, fmt.Errorf("bad CPU list %q", s)
			}
		}
		n += b - a + 1
	}
	return n, nil
}
