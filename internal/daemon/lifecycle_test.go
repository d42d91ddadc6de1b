package daemon

import (
	"errors"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeProbe stands for a loaded probe: its Update blocks while gating is
// closed, and it fails the test if used after Close.
type fakeProbe struct {
	t       *testing.T
	gating  chan struct{} // Update waits on it when not nil
	entered chan struct{} // closed once Update has begun
	once    sync.Once
	closed  atomic.Bool
	reloads atomic.Int64
}

func (p *fakeProbe) Update(ch chan<- prometheus.Metric) error {
	if p.closed.Load() {
		p.t.Error("scrape read a closed probe")
	}
	if p.gating != nil {
		p.once.Do(func() { close(p.entered) })
		<-p.gating
	}
	if p.closed.Load() {
		p.t.Error("probe closed while a scrape read it")
	}
	return nil
}

func (p *fakeProbe) Programs() map[string]*ebpf.Program { return nil }
func (p *fakeProbe) BoundedMaps() map[string]*ebpf.Map  { return nil }

func (p *fakeProbe) Reload() error {
	if p.closed.Load() {
		p.t.Error("reload of a closed probe")
	}
	p.reloads.Add(1)
	return nil
}

func (p *fakeProbe) Close() error {
	p.closed.Store(true)
	return nil
}

func fakeDaemon(t *testing.T, p *fakeProbe) *Daemon {
	t.Helper()
	s := map[string]starter{"fake": func(env) (loaded, error) { return p, nil }}
	d, err := newDaemon(testConfig("fake", false), slog.New(slog.NewTextHandler(io.Discard, nil)), s)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Close waits for a scrape reading the maps, and scrapes after it gather
// nothing from the probes.
func TestCloseWaitsForScrape(t *testing.T) {
	p := &fakeProbe{t: t, gating: make(chan struct{}), entered: make(chan struct{})}
	d := fakeDaemon(t, p)
	gathered := make(chan error, 1)
	go func() {
		_, done, err := d.gate.Gather()
		done()
		gathered <- err
	}()
	<-p.entered
	closed := make(chan error, 1)
	go func() { closed <- d.Close() }()
	// Wait until Close waits for the scrape: a writer waiting on the
	// gate's lock makes TryRLock fail.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		select {
		case <-closed:
			t.Fatal("Close returned while a scrape was reading the probe")
		default:
		}
		if d.gate.mu.TryRLock() {
			d.gate.mu.RUnlock()
		} else {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Close never waited on the gate for the scrape in progress")
		}
	}
	if p.closed.Load() {
		t.Error("Close closed the probe before the scrape reading it ended")
	}
	close(p.gating)
	if err := <-gathered; err != nil {
		t.Errorf("scrape in progress: %v", err)
	}
	if err := <-closed; err != nil {
		t.Errorf("Close: %v", err)
	}
	if !p.closed.Load() {
		t.Error("probe not closed")
	}
	if _, done, err := d.gate.Gather(); !errors.Is(err, errClosing) {
		t.Errorf("scrape after Close: %v, want %v", err, errClosing)
	} else {
		done()
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// Reloads (SIGHUP) racing Close never reach a closed probe.
func TestReloadDuringClose(t *testing.T) {
	p := &fakeProbe{t: t}
	d := fakeDaemon(t, p)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				d.Reload()
			}
		}()
	}
	// Close once reloads reach the probe, while the others still run.
	for deadline := time.Now().Add(5 * time.Second); p.reloads.Load() == 0 && time.Now().Before(deadline); {
		runtime.Gosched()
	}
	if err := d.Close(); err != nil {
		t.Error(err)
	}
	wg.Wait()
	if p.reloads.Load() == 0 {
		t.Error("no reload reached the probe before Close; the test proves nothing")
	}
}

// A probe whose loading panics is down; the others run.
func TestPanickingProbeIsolated(t *testing.T) {
	p := &fakeProbe{t: t}
	s := map[string]starter{
		"fake":  func(env) (loaded, error) { return p, nil },
		"buggy": func(env) (loaded, error) { var m map[string]*int; *m["x"]++; return nil, nil },
	}
	var logs strings.Builder
	d, err := newDaemon(testConfig("buggy,fake", false), slog.New(slog.NewTextHandler(&logs, nil)), s)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Running() != 1 {
		t.Fatalf("%d probes running, want 1", d.Running())
	}
	want := "\n# HELP ktel_probe_up Whether a probe is loaded and attached (1) or could not be (0).\n# TYPE ktel_probe_up gauge\n" +
		"ktel_probe_up{probe=\"buggy\"} 0\nktel_probe_up{probe=\"fake\"} 1\n"
	if err := testutil.GatherAndCompare(d.reg, strings.NewReader(want), "ktel_probe_up"); err != nil {
		t.Error(err)
	}
	if !strings.Contains(logs.String(), "loading panicked") {
		t.Errorf("panic not logged:\n%s", logs.String())
	}
}
