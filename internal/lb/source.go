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

// Applier is what a source of services other than the file applies them
// through: a Manager.
type Applier interface {
	// ApplyServices makes svcs the services.
	ApplyServices(svcs []Service) error
	// ApplyChanges changes the services by upsert and remove, leaving
	// the others as they are.
	ApplyChanges(upsert []Service, remove []string) error
}

// ApplyServices applies svcs as Reload applies a file, counted in the same
// statistics. On error the previous services stay in place.
func (m *Manager) ApplyServices(svcs []Service) error {
	a, err := m.applyServices(svcs)
	m.closeUDP(a) // without mu: scrapes do not wait for it
	return err
}

// ApplyChanges changes the applied services by upsert (added, or
// replacing the service of the same name) and remove (names), leaving the
// others as they are (State.ApplyChanges), counted as ApplyServices is. On
// error the previous services stay in place.
func (m *Manager) ApplyChanges(upsert []Service, remove []string) error {
	a, err := m.applyChanges(upsert, remove, false)
	m.closeUDP(a)
	return err
}

func (m *Manager) applyServices(svcs []Service) (Applied, error) {
	return m.applyChanges(svcs, nil, true)
}

func (m *Manager) applyChanges(svcs []Service, remove []string, full bool) (Applied, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	start := time.Now()
	var (
		a   Applied
		err error
	)
	if full {
		a, err = m.state.Apply(svcs)
	} else {
		a, err = m.state.ApplyChanges(svcs, remove)
	}
	if err != nil {
		m.bad++
		m.log.Error(FailureMessage("services", err), "source", m.source, "err", strings.ReplaceAll(err.Error(), "\n", "; "))
		return a, err
	}
	m.applyDur = time.Since(start)
	m.ok++
	m.lastOK = time.Now()
	if a.Written > 0 || a.Deleted > 0 {
		n, nb := m.state.Len()
		m.log.Info("services applied", "source", m.source, "services", n, "backends", nb,
			"written", a.Written, "deleted", a.Deleted, "slots_written", a.Slots, "apply_took", m.applyDur,
			"udp_backends_removed", a.UDPRemoved)
	}
	return a, nil
}
