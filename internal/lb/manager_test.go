package lb

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestManagerWatch(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "services.yaml")
	write := func(content string) {
		t.Helper()
		// Replace, as editors do: the watcher must follow the name.
		if err := os.WriteFile(file+".tmp", []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			t.Fatal(err)
		}
	}
	one := "services:\n  - {name: a, vip: 10.96.0.1, port: 80, backends: [{address: 10.0.0.1, port: 80}]}\n"
	write(one)
	now := time.Unix(0, 0)
	f := newFake(t, &now)
	s, err := NewState(f, Limits{MaxServices: 8, MaxSlots: 8, MaxCounters: 8})
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	m := NewManager(file, s, slog.New(slog.NewTextHandler(&logs, nil)))
	if err := m.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := m.Watch(); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	wait := func(what string, cond func(ReloadStats) bool) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if cond(m.Stats()) {
				return
			}
		}
		t.Fatalf("timed out waiting for %s; stats %+v", what, m.Stats())
	}

	write(strings.Replace(one, "10.0.0.1", "10.0.0.2", 1))
	wait("reload", func(r ReloadStats) bool { return r.Success == 2 })
	if svcs, nb := m.Services(); len(svcs) != 1 || nb != 1 || svcs[0].Backends[0].Addr.String() != "10.0.0.2:80" {
		t.Errorf("applied %+v", svcs)
	}

	write("services:\n  - {name: a, vip: 10.96.0.1, port: 99999}\n")
	wait("rejection", func(r ReloadStats) bool { return r.Error == 1 })
	if !strings.Contains(logs.String(), "services[0].port: 99999 is out of range") {
		t.Errorf("log lacks the reason:\n%s", logs.String())
	}
	if got := f.backendsOf("10.96.0.1:80"); len(got) != 1 || got[0] != "10.0.0.2:80" {
		t.Errorf("invalid file changed the datapath: %v", got)
	}

	// The same content again is not a change; Reload always applies.
	checked := checks(m)
	write("services:\n  - {name: a, vip: 10.96.0.1, port: 99999}\n")
	wait("the watcher to read the file", func(ReloadStats) bool { return checks(m) > checked })
	if r := m.Stats(); r.Error != 1 {
		t.Errorf("unchanged content reloaded: %+v", r)
	}
	if err := m.Reload(); err == nil {
		t.Error("Reload accepted the invalid file")
	}
	if r := m.Stats(); r.Error != 2 || r.Success != 2 || r.LastSuccess.IsZero() {
		t.Errorf("stats %+v", r)
	}

	// Other files in the directory are ignored: the watcher sees both
	// events of the write (create, close), and does not read the file.
	ignored, checked := m.watch.ignored.Load(), checks(m)
	if err := os.WriteFile(filepath.Join(dir, "other"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	wait("the watcher to ignore the other file", func(ReloadStats) bool { return m.watch.ignored.Load() >= ignored+2 })
	if r := m.Stats(); r.Error != 2 || checks(m) != checked {
		t.Errorf("another file triggered a reload: %+v, %d reads of the file", r, checks(m)-checked)
	}
	if err := m.Close(); err != nil {
		t.Error(err)
	}
}

// checks returns how many times the watcher has read the file.
func checks(m *Manager) uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.checks
}

func discardLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestManagerMissingFile(t *testing.T) {
	now := time.Unix(0, 0)
	s, _ := NewState(newFake(t, &now), Limits{MaxServices: 1, MaxSlots: 1, MaxCounters: 1})
	m := NewManager(filepath.Join(t.TempDir(), "none.yaml"), s, discardLog())
	if err := m.Reload(); err == nil || m.Stats().Error != 1 {
		t.Errorf("missing file: %v %+v", err, m.Stats())
	}
}

// A failed read is counted under the lock that Stats (a scrape) takes:
// Reloads of a missing file race with no scrape (go test -race).
func TestManagerMissingFileCountedLocked(t *testing.T) {
	now := time.Unix(0, 0)
	s, _ := NewState(newFake(t, &now), Limits{MaxServices: 1, MaxSlots: 1, MaxCounters: 1})
	m := NewManager(filepath.Join(t.TempDir(), "none.yaml"), s, discardLog())
	const n = 500
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range n {
			_ = m.Reload()
		}
	}()
	for range n {
		_ = m.Stats()
	}
	<-done
	if got := m.Stats().Error; got != n {
		t.Errorf("%d errors counted, want %d", got, n)
	}
}
