package lb

import (
	"log/slog"
	"strings"
	"time"
)

// NewSourceManager returns a Manager for services that come from
// elsewhere than a file (the Kubernetes API: internal/kubelb), given
// through ApplyServices. Reload and Watch do not apply to it.
func NewSourceManager(source string, state *State, log *slog.Logger) *Manager {
	return &Manager{state: state, log: log, source: source}
}

// ApplyServices applies svcs as Reload applies a file, counted in the same
// statistics. On error the previous services stay in place.
func (m *Manager) ApplyServices(svcs []Service) error {
	a, err := m.applyServices(svcs)
	m.closeUDP(a) // without mu: scrapes do not wait for it
	return err
}

func (m *Manager) applyServices(svcs []Service) (Applied, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	start := time.Now()
	a, err := m.state.Apply(svcs)
	if err != nil {
		m.bad++
		m.log.Error("services rejected; the previous ones keep serving", "source", m.source,
			"err", strings.ReplaceAll(err.Error(), "\n", "; "))
		return a, err
	}
	m.applyDur = time.Since(start)
	m.ok++
	m.lastOK = time.Now()
	m.backends = 0
	for _, s := range svcs {
		m.backends += len(s.Backends)
	}
	if a.Written > 0 || a.Deleted > 0 {
		m.log.Info("services applied", "source", m.source, "services", len(svcs), "backends", m.backends,
			"written", a.Written, "deleted", a.Deleted, "slots_written", a.Slots, "apply_took", m.applyDur,
			"udp_backends_removed", a.UDPRemoved)
	}
	return a, nil
}
