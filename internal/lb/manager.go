package lb

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Manager keeps the datapath in step with a services file: Reload applies
// it, Watch reloads it when it changes. An invalid file is logged and
// counted, and the previous configuration keeps serving.
type Manager struct {
	file   string
	source string // NewSourceManager
	log    *slog.Logger

	mu    sync.Mutex
	state *State
	// closeMu serializes the closing of UDP sockets to removed backends,
	// done after mu is released so that Services and Stats (scrapes) do
	// not wait for it.
	closeMu  sync.Mutex
	last     []byte // content of the last file read by the watcher
	ok, bad  uint64
	lastOK   time.Time
	applyDur time.Duration
	checks   uint64 // reads of the file by the watcher, changed or not

	watch *watcher
}

// ReloadStats counts reloads of the services file.
type ReloadStats struct {
	Success, Error uint64
	LastSuccess    time.Time // zero before the first success
	// LastApply is how long the last successful reload took to write the
	// maps, after parsing.
	LastApply time.Duration
}

// NewManager returns a Manager of file over state. It applies nothing
// until Reload.
func NewManager(file string, state *State, log *slog.Logger) *Manager {
	return &Manager{file: file, state: state, log: log}
}

// Reload reads and applies the services file. On error the previous
// configuration stays in place.
func (m *Manager) Reload() error {
	m.mu.Lock()
	data, err := os.ReadFile(m.file)
	if err != nil {
		err = m.failed(fmt.Errorf("read services file: %w", err)) // counted under mu
		m.mu.Unlock()
		return err
	}
	a, err := m.apply(data)
	m.mu.Unlock()
	m.closeUDP(a)
	return err
}

// reloadIfChanged reloads only when the file's content differs from the
// last read: editors and Kubernetes fire several events per change.
func (m *Manager) reloadIfChanged() {
	m.mu.Lock()
	m.checks++
	data, err := os.ReadFile(m.file)
	if err != nil {
		if m.last != nil {
			m.last = nil
			_ = m.failed(fmt.Errorf("read services file: %w", err))
		}
		m.mu.Unlock()
		return
	}
	if m.last != nil && bytes.Equal(data, m.last) {
		m.mu.Unlock()
		return
	}
	a, _ := m.apply(data)
	m.mu.Unlock()
	m.closeUDP(a)
}

// apply parses and applies data, with mu held. The caller runs closeUDP
// on the result after releasing mu, whether or not apply failed.
func (m *Manager) apply(data []byte) (Applied, error) {
	m.last = data
	start := time.Now()
	svcs, err := Parse(m.file, data)
	if err != nil {
		return Applied{}, m.failed(err)
	}
	parsed := time.Now()
	a, err := m.state.Apply(svcs)
	if err != nil {
		return a, m.failed(err)
	}
	m.applyDur = time.Since(parsed)
	m.ok++
	m.lastOK = time.Now()
	_, nb := m.state.Len()
	m.log.Info("services applied", "file", m.file, "services", len(svcs), "backends", nb,
		"written", a.Written, "deleted", a.Deleted, "slots_written", a.Slots,
		"parse_took", parsed.Sub(start), "apply_took", m.applyDur,
		"udp_backends_removed", a.UDPRemoved)
	return a, nil
}

// closeUDP closes the connected UDP sockets to the backends the apply a
// removed, without mu, and logs the result: for the services file and
// for ApplyServices alike.
func (m *Manager) closeUDP(a Applied) {
	if a.UDPRemoved == 0 {
		return
	}
	m.closeMu.Lock()
	defer m.closeMu.Unlock()
	start := time.Now()
	m.state.CloseUDP(&a)
	m.log.Info("connected UDP sockets to removed backends closed", "udp_backends_removed", a.UDPRemoved,
		"udp_sockets_closed", a.UDPClosed, "took", time.Since(start))
	if a.UDPCloseErr != nil {
		m.log.Warn("connected UDP sockets to removed backends not all closed", "err", a.UDPCloseErr)
	}
}

// failed counts and logs a rejected file, with mu held.
func (m *Manager) failed(err error) error {
	m.bad++
	// One line: the joined field errors, separated by "; ".
	m.log.Error(FailureMessage("services file", err), "file", m.file, "err", strings.ReplaceAll(err.Error(), "\n", "; "))
	return err
}

// Stats returns the reload counters.
func (m *Manager) Stats() ReloadStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return ReloadStats{Success: m.ok, Error: m.bad, LastSuccess: m.lastOK, LastApply: m.applyDur}
}

// Services returns the applied services and the number of backends.
func (m *Manager) Services() ([]ServiceStatus, int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	// The State's count, not the last successful apply's: an apply that
	// failed only to delete removed services still changed the services.
	_, nb := m.state.Len()
	return m.state.Services(), nb
}

// Watch reloads the file when it changes, until Close. It watches the
// directory rather than the file, since editors and Kubernetes replace
// files (rename, symlink swap) instead of writing them in place.
func (m *Manager) Watch() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.watch != nil {
		return errors.New("already watching")
	}
	w, err := newWatcher(m.file, m.reloadIfChanged, m.log)
	if err != nil {
		return err
	}
	m.watch = w
	return nil
}

// Close stops watching.
func (m *Manager) Close() error {
	m.mu.Lock()
	w := m.watch
	m.watch = nil
	m.mu.Unlock()
	if w == nil {
		return nil
	}
	return w.close()
}

// debounce is how long the watcher waits for a burst of events to end.
const debounce = 100 * time.Millisecond

type watcher struct {
	f    *os.File
	done chan struct{}
	wg   sync.WaitGroup
	// ignored counts events about other files: it shows that the
	// watcher has read an event and decided to do nothing.
	ignored atomic.Uint64
}

func newWatcher(file string, onChange func(), log *slog.Logger) (*watcher, error) {
	dir, base := filepath.Split(filepath.Clean(file))
	if dir == "" {
		dir = "."
	}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	const mask = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_CREATE | unix.IN_DELETE | unix.IN_ATTRIB
	if _, err := unix.InotifyAddWatch(fd, dir, mask); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	// Non-blocking, so os.File reads through the poller and Close
	// interrupts them.
	w := &watcher{f: os.NewFile(uintptr(fd), "inotify"), done: make(chan struct{})}
	kick := make(chan struct{}, 1)
	w.wg.Go(func() {
		defer close(kick)
		buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
		for {
			n, err := w.f.Read(buf)
			if err != nil {
				select {
				case <-w.done:
				default:
					log.Error("services file watcher stopped", "err", err)
				}
				return
			}
			hit, ignored := relevant(buf[:n], base)
			w.ignored.Add(uint64(ignored))
			if hit {
				select {
				case kick <- struct{}{}:
				default:
				}
			}
		}
	})
	w.wg.Go(func() {
		for range kick {
			// Wait until no event came for debounce, or at most 1 s.
			deadline := time.After(time.Second)
		quiet:
			for {
				select {
				case _, ok := <-kick:
					if !ok {
						return
					}
				case <-time.After(debounce):
					break quiet
				case <-deadline:
					break quiet
				}
			}
			onChange()
		}
	})
	return w, nil
}

// relevant reports whether events name the file, or Kubernetes' "..data"
// symlink that a ConfigMap update swaps, and how many do not.
func relevant(buf []byte, base string) (hit bool, ignored int) {
	for off := 0; off+unix.SizeofInotifyEvent <= len(buf); {
		ev := (*unix.InotifyEvent)(unsafePointer(buf[off:]))
		nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
		name := string(bytes.TrimRight(nameBytes, "\x00"))
		off += unix.SizeofInotifyEvent + int(ev.Len)
		if name == base || name == "..data" || ev.Mask&unix.IN_Q_OVERFLOW != 0 {
			hit = true
		} else {
			ignored++
		}
	}
	return hit, ignored
}

func (w *watcher) close() error {
	close(w.done)
	err := w.f.Close()
	w.wg.Wait()
	return err
}
