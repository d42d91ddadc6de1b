package probe

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
)

// SpanOptions configure a probe's outlier events (bpf/headers/ktel_events.h).
type SpanOptions struct {
	// Threshold: events lasting at least this long are emitted. Zero
	// disables events; the ring buffer then shrinks to one page.
	Threshold time.Duration
	// Always emits every event, whatever its duration (retransmits).
	Always bool
	// Rate bounds events per second over all CPUs; 0 means no limit. Each
	// CPU online at load gets an even share (its own token bucket, which
	// costs no lock on the hot path), and may save up a second's worth.
	Rate int
	// RingSize is the ring buffer size in bytes, a power-of-two multiple of
	// the page size; 0 means 256 KiB.
	RingSize int
}

// Enabled reports whether events are emitted at all.
func (o SpanOptions) Enabled() bool { return o.Always || o.Threshold > 0 }

// Apply writes the options into spec's read-only data and sizes its ring
// buffer.
func (o SpanOptions) Apply(spec *ebpf.CollectionSpec) error {
	page := os.Getpagesize()
	ring := uint32(page)
	threshold := ^uint64(0)
	if o.Enabled() {
		ring = 256 << 10
		if o.RingSize > 0 {
			if o.RingSize%page != 0 || o.RingSize&(o.RingSize-1) != 0 {
				return fmt.Errorf("ring buffer size %d is not a power-of-two multiple of the page size %d", o.RingSize, page)
			}
			ring = uint32(o.RingSize)
		}
		threshold = uint64(o.Threshold.Nanoseconds())
		if o.Always {
			threshold = 0
		}
	}
	// Shares of the CPUs that run: a host may have many more possible
	// CPUs than online ones (hot-plug slots), which never send.
	cost, burst := uint64(0), uint64(time.Second.Nanoseconds())
	if o.Rate > 0 {
		online, err := OnlineCPUs()
		if err != nil {
			return err
		}
		cost = burst * uint64(online) / uint64(o.Rate)
		// A rate below the number of CPUs: a CPU's event costs more than
		// a second; its bucket must hold one, or it would never send.
		burst = max(burst, cost)
	}
	m, ok := spec.Maps["ktel_events"]
	if !ok {
		return fmt.Errorf("no ktel_events map")
	}
	m.MaxEntries = ring
	for name, v := range map[string]uint64{
		"ktel_span_threshold_ns": threshold,
		"ktel_span_cost_ns":      cost,
		"ktel_span_burst_ns":     burst,
		// A wakeup per quarter of the ring bounds latency under load; the
		// reader polls for the rest.
		"ktel_span_wakeup_bytes": uint64(ring / 4),
	} {
		if err := SetVar(spec, name, v); err != nil {
			return err
		}
	}
	return nil
}

// SpanDrops are events the kernel did not deliver.
type SpanDrops struct {
	RateLimited uint64 // refused by the token bucket
	RingbufFull uint64 // no room in the ring buffer
}

// ReadSpanDrops sums ktel_span_drops over CPUs.
func ReadSpanDrops(m *ebpf.Map) (SpanDrops, error) {
	sums, err := SumPerCPUArray(m, 2) // KTEL_SPAN_DROP_REASONS
	if err != nil {
		return SpanDrops{}, fmt.Errorf("read ktel_span_drops: %w", err)
	}
	return SpanDrops{RateLimited: sums[0], RingbufFull: sums[1]}, nil
}

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
