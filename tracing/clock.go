package tracing

import (
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Clock converts the kernel's CLOCK_MONOTONIC timestamps (bpf_ktime_get_ns)
// to wall time. The offset between the two clocks is measured once and
// refreshed periodically, because NTP slews the wall clock and a suspend
// stops the monotonic one.
type Clock struct {
	refresh time.Duration

	mu       sync.Mutex
	offset   int64 // wall ns - monotonic ns
	measured int64 // monotonic ns of the measurement; 0: never
	wallAt   int64 // wall ns of the measurement
	// Reads of both clocks, replaceable in tests.
	mono func() int64
	wall func() int64
}

// NewClock returns a Clock that refreshes its offset when older than
// refresh.
func NewClock(refresh time.Duration) *Clock {
	return &Clock{refresh: refresh, mono: monotonicNow, wall: func() int64 { return time.Now().UnixNano() }}
}

func monotonicNow() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(err) // cannot fail on Linux with a valid clock id
	}
	return ts.Nano()
}

// measure samples both clocks a few times and keeps the sample whose
// monotonic reads are closest together: its wall read is the best match.
func (c *Clock) measure() int64 {
	best, bestGap := int64(0), int64(-1)
	for range 5 {
		m1 := c.mono()
		w := c.wall()
		m2 := c.mono()
		if gap := m2 - m1; bestGap < 0 || gap < bestGap {
			best, bestGap = w-(m1+gap/2), gap
		}
	}
	return best
}

// Wall converts a CLOCK_MONOTONIC timestamp in ns to wall time. The
// offset is measured again once refresh has passed by either clock: the
// monotonic clock stops during a suspend, the wall clock does not, so a
// resume is noticed at the first conversion after it.
func (c *Clock) Wall(monoNs uint64) time.Time {
	c.mu.Lock()
	if m, w := c.mono(), c.wall(); c.measured == 0 || m-c.measured > int64(c.refresh) || abs(w-c.wallAt) > int64(c.refresh) {
		c.offset = c.measure()
		c.measured, c.wallAt = m, w
	}
	off := c.offset
	c.mu.Unlock()
	return time.Unix(0, int64(monoNs)+off)
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}
