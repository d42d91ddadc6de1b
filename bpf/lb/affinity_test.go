package lb

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// affinityServices has the same four backends behind a service with
// ClientIP affinity of timeout seconds and one without; and two UDP
// backends behind a UDP service with affinity. sticky lists the TCP
// backends of the sticky service.
func affinityServices(timeout int, sticky ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "services:\n  - name: sticky\n    vip: 10.96.0.20\n    port: 80\n    sessionAffinity: {clientIP: {timeoutSeconds: %d}}\n    backends:\n", timeout)
	for _, a := range sticky {
		fmt.Fprintf(&b, "      - {address: %s, port: 8080}\n", a)
	}
	b.WriteString("  - name: loose\n    vip: 10.96.0.21\n    port: 80\n    backends:\n")
	for _, a := range affinityBackends {
		fmt.Fprintf(&b, "      - {address: %s, port: 8080}\n", a)
	}
	fmt.Fprintf(&b, `  - name: dns
    vip: 10.96.0.53
    port: 53
    protocol: udp
    sessionAffinity: {clientIP: {timeoutSeconds: %d}}
    backends:
      - {address: 127.0.0.5, port: 5353}
      - {address: 127.0.0.6, port: 5353}
`, timeout)
	return b.String()
}

var affinityBackends = []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.7"}

// onlyBackend returns the one backend r reached, failing unless all n
// exchanges reached the same one.
func onlyBackend(t *testing.T, r clientResult, n int) string {
	t.Helper()
	if r.OK != n || len(r.Errors) > 0 || len(r.Backends) != 1 {
		t.Fatalf("%d of %d exchanges ok, backends %v, errors %v; want all to one backend", r.OK, n, r.Backends, r.Errors)
	}
	for b := range r.Backends {
		return b
	}
	return ""
}

// ClientIP affinity: connects of one client (the sandbox's namespace) go
// to one backend, across processes and sockets, TCP and unconnected UDP;
// after timeout seconds without a connect the choice is made afresh; a
// backend that leaves the service is not chosen again; a service without
// affinity spreads.
func TestSessionAffinity(t *testing.T) {
	testenv.Privileged(t)
	sb := newSandbox(t)
	for _, b := range affinityBackends {
		sb.serveTCP(t, b+":8080")
	}
	sb.serveUDP(t, "127.0.0.5:5353")
	sb.serveUDP(t, "127.0.0.6:5353")
	const timeout = 1 // second
	file := filepath.Join(t.TempDir(), "services.yaml")
	writeFile(t, file, affinityServices(timeout, affinityBackends...))
	p := load(t, Options{Cgroup: sb.Cgroup, ServicesFile: file})

	const n = 40
	// Within the timeout of each other (each process takes a few ms).
	first := onlyBackend(t, sb.run(t, clientSpec{mode: "tcp", addr: "10.96.0.20:80", n: n, inCgroup: true}), n)
	if again := onlyBackend(t, sb.run(t, clientSpec{mode: "tcp", addr: "10.96.0.20:80", n: n, inCgroup: true}), n); again != first {
		t.Errorf("second client went to %s, first to %s", again, first)
	}
	// Unconnected UDP: a new socket per datagram, one backend.
	onlyBackend(t, sb.run(t, clientSpec{mode: "udp", addr: "10.96.0.53:53", n: n, inCgroup: true}), n)

	// Without affinity the same backends share the connects (four
	// backends: all 40 on one happens once in 4^39 runs).
	if r := sb.run(t, clientSpec{mode: "tcp", addr: "10.96.0.21:80", n: n, inCgroup: true}); r.OK != n || len(r.Backends) < 2 {
		t.Errorf("service without affinity: %d ok, backends %v; want several", r.OK, r.Backends)
	}

	// After the timeout the backend is chosen again: another one within
	// 10 tries unless chance keeps the same (1 in 4^10).
	last := first
	var changed bool
	for i := 0; i < 10 && !changed; i++ {
		time.Sleep(timeout*time.Second + 200*time.Millisecond) // the timeout itself
		last = onlyBackend(t, sb.run(t, clientSpec{mode: "tcp", addr: "10.96.0.20:80", n: 1, inCgroup: true}), 1)
		changed = last != first
	}
	if !changed {
		t.Errorf("still on %s after 10 timeouts", first)
	}

	// The remembered backend leaves the service: the next connects, well
	// within the timeout (now 1 hour), go to one of the others, and stay.
	writeFile(t, file, affinityServices(3600, affinityBackends...))
	if err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	cur := onlyBackend(t, sb.run(t, clientSpec{mode: "tcp", addr: "10.96.0.20:80", n: n, inCgroup: true}), n)
	var rest []string
	for _, b := range affinityBackends {
		if b+":8080" != cur {
			rest = append(rest, b)
		}
	}
	writeFile(t, file, affinityServices(3600, rest...))
	if err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	next := onlyBackend(t, sb.run(t, clientSpec{mode: "tcp", addr: "10.96.0.20:80", n: n, inCgroup: true}), n)
	if next == cur {
		t.Errorf("connects still go to %s, removed from the service", cur)
	}
	if s := snapshot(t, p); s.AffinityFailed+s.SlotMissing+s.ReverseFailed != 0 {
		t.Errorf("drops: %+v", s)
	}
}
