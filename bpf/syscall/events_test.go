package syscall

import (
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
)

func TestOutlierEvents(t *testing.T) {
	testenv.Privileged(t)
	p, err := Load(Options{Schema: 3, Spans: probe.SpanOptions{Threshold: 50 * time.Millisecond}}, discard())
	if err != nil {
		t.Fatalf("%+v", err)
	}
	defer p.Close()
	rd, err := ringbuf.NewReader(p.Events())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := uint32(unix.Gettid())
	before := time.Now()
	testenv.Sleep(t, 120*time.Millisecond)
	slept := time.Since(before)
	unix.Getpid() // fast: no event

	// The thread also waits in epoll while draining; those are outliers
	// too. The getpid is not.
	var mine []Event
	for _, e := range testenv.Records(t, rd, 300*time.Millisecond, DecodeEvent) {
		if e.Tid == tid && e.Nr != unix.SYS_EPOLL_PWAIT {
			mine = append(mine, e)
		}
	}
	// A signal may have split the sleep into several syscalls: together
	// they last as long as the sleep, and none is a getpid.
	if len(mine) == 0 {
		t.Fatal("no event from this thread")
	}
	var d time.Duration
	for _, e := range mine {
		d += time.Duration(e.EndNs - e.StartNs)
		if e.Nr != unix.SYS_CLOCK_NANOSLEEP || e.Pid != uint32(os.Getpid()) || e.Comm == "" || e.ProcessComm != "syscall.test" {
			t.Errorf("event %+v, want clock_nanosleep by pid %d (syscall.test)", e, os.Getpid())
		}
	}
	if d < 120*time.Millisecond || d > slept {
		t.Errorf("events last %v in all, want 120ms <= d <= %v", d, slept)
	}
}

// A storm of events is capped at the configured rate, and the excess is
// counted as rate limited.
func TestRateLimit(t *testing.T) {
	testenv.Privileged(t)
	const rate = 200
	p, err := Load(Options{Schema: 3, Spans: probe.SpanOptions{Threshold: 1, Rate: rate}}, discard())
	if err != nil {
		t.Fatalf("%+v", err)
	}
	defer p.Close()
	rd, err := ringbuf.NewReader(p.Events())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	start := time.Now()
	for time.Since(start) < time.Second {
		for range 1000 {
			unix.Getpid()
		}
	}
	// Events keep coming from the rest of the host while draining.
	got := len(testenv.Records(t, rd, 200*time.Millisecond, DecodeEvent))
	elapsed := time.Since(start)
	s, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	// Each CPU may send a full second's burst on top of the steady rate.
	limit := int(float64(rate)*elapsed.Seconds()) + rate + rate/10
	t.Logf("%d events in %v, %d rate limited, %d ring full", got, elapsed, s.SpanDrops.RateLimited, s.SpanDrops.RingbufFull)
	if got > limit {
		t.Errorf("%d events delivered in %v, want <= %d at %d/s", got, elapsed, limit, rate)
	}
	if got < rate/2 {
		t.Errorf("only %d events delivered", got)
	}
	if s.SpanDrops.RateLimited < 10000 {
		t.Errorf("%d rate-limited events counted, want the storm's excess", s.SpanDrops.RateLimited)
	}
}

func FuzzDecodeEvent(f *testing.F) {
	f.Add(make([]byte, EventSize))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEvent(b)
		if err == nil && (len(b) != EventSize || e.EndNs < e.StartNs || len(e.Comm) > 16) {
			t.Fatalf("accepted %d bytes as %+v", len(b), e)
		}
	})
}
