package probe

import (
	"fmt"
	"os"
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

// spanSpecs are the map and variables of ktel_events.h.
type spanSpecs struct {
	Events      *ebpf.MapSpec      `ebpf:"ktel_events"`
	Threshold   *ebpf.VariableSpec `ebpf:"ktel_span_threshold_ns"`
	Cost        *ebpf.VariableSpec `ebpf:"ktel_span_cost_ns"`
	Burst       *ebpf.VariableSpec `ebpf:"ktel_span_burst_ns"`
	WakeupBytes *ebpf.VariableSpec `ebpf:"ktel_span_wakeup_bytes"`
}

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
	var specs spanSpecs
	if err := spec.Assign(&specs); err != nil {
		return fmt.Errorf("span objects: %w", err)
	}
	specs.Events.MaxEntries = ring
	for _, v := range []struct {
		spec *ebpf.VariableSpec
		v    uint64
	}{
		{specs.Threshold, threshold},
		{specs.Cost, cost},
		{specs.Burst, burst},
		// A wakeup per quarter of the ring bounds latency under load; the
		// reader polls for the rest.
		{specs.WakeupBytes, uint64(ring / 4)},
	} {
		if err := v.spec.Set(v.v); err != nil {
			return fmt.Errorf("set %s: %w", v.spec.Name, err)
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
