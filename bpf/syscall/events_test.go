package syscall

import (
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// loadWithEvents loads the probe with opts and opens a reader on its ring
// buffer, both closed when the test ends.
func loadWithEvents(t *testing.T, opts Options) (*Probe, *ringbuf.Reader) {
	t.Helper()
	return testenv.LoadWithEvents(t, func() (*Probe, error) { return Load(opts, discard()) })
}

func TestOutlierEvents(t *testing.T) {
	testenv.Privileged(t)
	_, rd := loadWithEvents(t, Options{Schema: 3, Spans: probe.SpanOptions{Threshold: 50 * time.Millisecond}})

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
	// The sleep ends at an absolute deadline 120 ms after a clock read
	// made just before the syscall: a little less than 120 ms inside it.
	if d < 115*time.Millisecond || d > slept {
		t.Errorf("events last %v in all, want 115ms <= d <= %v", d, slept)
	}
}

// A storm of events is capped at the configured rate, and the excess is
// counted as rate limited.
func TestRateLimit(t *testing.T) {
	testenv.Privileged(t)
	const rate = 200
	p, rd := loadWithEvents(t, Options{Schema: 3, Spans: probe.SpanOptions{Threshold: 1, Rate: rate}})

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

// A rate below the number of CPUs still lets events through: a CPU's share
// of an event costs more than a second, and its bucket must hold it.
func TestRateBelowCPUs(t *testing.T) {
	testenv.Privileged(t)
	online, err := probe.OnlineCPUs()
	if err != nil {
		t.Fatal(err)
	}
	if online < 2 {
		t.Fatal("needs 2 CPUs") // CI machines have them
	}
	p, rd := loadWithEvents(t, Options{Schema: 3, Spans: probe.SpanOptions{Threshold: 1, Rate: 1}})
	start := time.Now()
	for time.Since(start) < 300*time.Millisecond {
		for range 1000 {
			unix.Getpid()
		}
	}
	got := len(testenv.Records(t, rd, 200*time.Millisecond, DecodeEvent))
	s, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	// Each CPU starts with one event's credit, and earns the next after
	// online seconds.
	t.Logf("%d events in %v, %d rate limited", got, time.Since(start), s.SpanDrops.RateLimited)
	if got < 1 || got > online {
		t.Errorf("%d events at 1/s over %d CPUs in under a second, want 1..%d", got, online, online)
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

// A syscall whose thread is switched out is timed whole: while it sleeps,
// another thread makes syscalls on its CPU, and every other sleep ends on
// another CPU. Events (one per sleep, by thread id) show that none is lost
// or cut short, in every variant.
func TestSwitchedOut(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	var cpus []int
	for c := 0; c < 1024 && len(cpus) < 2; c++ {
		if set.IsSet(c) {
			cpus = append(cpus, c)
		}
	}
	if len(cpus) < 2 {
		t.Fatal("needs two CPUs") // CI machines have them
	}
	pin := func(tid, cpu int) {
		var s unix.CPUSet
		s.Set(cpu)
		if err := unix.SchedSetaffinity(tid, &s); err != nil {
			t.Error(err)
		}
	}
	// unpin gives a pinned thread back its CPUs before unlocking it, so that
	// the goroutines it serves next are not confined to one CPU.
	unpin := func() {
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			t.Error(err)
		}
		runtime.UnlockOSThread()
	}
	const n, sleep = 20, 5 * time.Millisecond
	for _, v := range Variants {
		t.Run(v.String(), func(t *testing.T) {
			p, rd := loadWithEvents(t, Options{Schema: 3, Variant: &v, Spans: probe.SpanOptions{Threshold: sleep / 2}})
			before, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}

			done := make(chan struct{})
			getpids := make(chan int)
			go func() { // on the sleeper's CPU, making syscalls all along
				runtime.LockOSThread()
				defer unpin()
				pin(0, cpus[0])
				var k int
				for {
					select {
					case <-done:
						getpids <- k
						return
					default:
					}
					for range 100 {
						unix.RawSyscall(unix.SYS_GETPID, 0, 0, 0)
					}
					k += 100
				}
			}()

			tids := make(chan int)
			asleep := make(chan struct{})
			go func() {
				runtime.LockOSThread()
				defer unpin()
				tids <- unix.Gettid()
				for i := range n {
					pin(0, cpus[0])
					asleep <- struct{}{}
					// A relative sleep: the getpid thread shares this CPU and
					// may preempt the sleeper before the syscall, which with
					// an absolute deadline (testenv.Sleep) would then last
					// less than the sleep, even less than the span threshold.
					req := unix.NsecToTimespec(sleep.Nanoseconds())
					for {
						err := unix.ClockNanosleep(unix.CLOCK_MONOTONIC, 0, &req, &req)
						if err == nil {
							break
						}
						if !errors.Is(err, unix.EINTR) {
							t.Error(err)
							break
						}
					}
					_ = i
				}
				close(asleep)
			}()
			tid := <-tids
			start := time.Now()
			var i int
			for range asleep {
				if i%2 == 1 { // move it while it sleeps: it wakes on the other CPU
					time.Sleep(sleep / 5)
					pin(tid, cpus[1])
				}
				i++
			}
			elapsed := time.Since(start)
			close(done)
			made := <-getpids

			var total time.Duration
			var count int
			for _, e := range testenv.Records(t, rd, 200*time.Millisecond, DecodeEvent) {
				if e.Tid == uint32(tid) && e.Nr == unix.SYS_CLOCK_NANOSLEEP {
					total += time.Duration(e.EndNs - e.StartNs)
					count++
				}
			}
			// A signal may split a sleep in two; together they still last it.
			if count < n || total < n*sleep || total > elapsed {
				t.Errorf("%d clock_nanosleep events lasting %v, want >= %d lasting %v..%v", count, total, n, n*sleep, elapsed)
			}
			after, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			if got := sum(delta(before, after, unix.SYS_GETPID)); got < uint64(made) {
				t.Errorf("getpid count rose by %d, want >= %d made on the sleeper's CPU", got, made)
			}
			if after.StartsDropped != 0 {
				t.Errorf("%d starts dropped", after.StartsDropped)
			}
		})
	}
}
