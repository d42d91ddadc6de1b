package reliability

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/testenv"
)

const (
	termCycles = 100 // start, /healthz, SIGTERM
	killCycles = 10  // start, /healthz, SIGKILL
)

// TestFaultCycles starts and stops the binary termCycles times with
// SIGTERM and killCycles times with SIGKILL, interleaved, with the default
// probes plus netdev on a veth pair inside a test namespace, with tcx
// where the kernel has it (6.6+) and clsact's cls_bpf filters where not.
// Each cycle waits only for /healthz: everything is attached before ktel
// serves. Afterwards none of the programs, maps and links ktel held in any
// cycle may be left in the kernel. tcx links go with the process; in
// clsact mode a SIGKILL leaves ktel's filters by design, and the next
// start replaces them: then only the last cycle's (a SIGKILL) may be left,
// held by its filters, until the veth pair goes.
func TestFaultCycles(t *testing.T) {
	testenv.Privileged(t)
	binary(t)

	ns := newNetns(t)
	testenv.Sh(t, "ip", "-n", ns, "link", "add", "krf0a", "type", "veth", "peer", "name", "krf0b")
	testenv.Sh(t, "ip", "-n", ns, "link", "set", "krf0a", "up")
	testenv.Sh(t, "ip", "-n", ns, "link", "set", "krf0b", "up")
	env := []string{
		"KTEL_LOG_LEVEL=warn",
		"KTEL_INTERFACES=krf*",
		"KTEL_NETDEV_NETNS=" + netnsPath(ns),
		"KTEL_NETDEV_TC_MODE=" + tcMode(t),
	}
	veths := []string{"krf0a", "krf0b"}

	ours := newObjects()
	var first, last kernelObjects
	start := time.Now()
	var upTotal time.Duration
	for i := range termCycles + killCycles {
		// Every 11th cycle is a SIGKILL, so that a start after a kill is
		// exercised ten times too.
		sig := syscall.SIGTERM
		if i%11 == 10 {
			sig = syscall.SIGKILL
		}
		t0 := time.Now()
		d := startDaemon(t, nil, env...)
		upTotal += time.Since(t0)
		o := held(t, d.pid())
		ours.add(o)
		last = o
		if i == 0 {
			first = o
			t.Logf("cycle 0: ktel holds %d programs, %d maps, %d links", len(o.progs), len(o.maps), len(o.links))
			// A link per program of each default probe's preferred
			// variant; netdev's 2 per veth are tcx links, or filters.
			want := len(sysprobe.Variants[0].Programs) + len(runqlat.Variants[0].Programs) + len(tcpretrans.Variants[0].Programs)
			if tcMode(t) == "tcx" {
				want += 2 * len(veths)
			} else if progs := netdevFilters(t, ns, veths...); len(progs) != 2*len(veths) || !all(progs, o.progs) {
				t.Fatalf("cycle 0: netdev's cls_bpf filters run programs %v, want 2 per veth of those ktel holds: %v\nstderr:\n%s", progs, o, d.Stderr)
			}
			if len(o.links) < want {
				t.Fatalf("cycle 0: only %d links held, want %d: %v\nstderr:\n%s", len(o.links), want, o, d.Stderr)
			}
		} else if len(o.progs) != len(first.progs) || len(o.links) != len(first.links) {
			t.Errorf("cycle %d: %d programs and %d links held, cycle 0 held %d and %d\nstderr:\n%s",
				i, len(o.progs), len(o.links), len(first.progs), len(first.links), d.Stderr)
		}

		ps := d.stop(t, sig)
		if err := checkExit(ps, sig); err != nil {
			t.Fatalf("cycle %d: %v\nstderr:\n%s", i, err, d.Stderr)
		}
		if sig == syscall.SIGTERM && d.Stderr.String() != "" {
			// Warnings or errors (KTEL_LOG_LEVEL=warn) in a clean cycle.
			t.Errorf("cycle %d: ktel logged:\n%s", i, d.Stderr)
		}
	}
	n := termCycles + killCycles
	t.Logf("%d cycles in %v (%v per cycle, %v of it until /healthz answered)",
		n, time.Since(start).Round(time.Millisecond), (time.Since(start) / time.Duration(n)).Round(time.Millisecond),
		(upTotal / time.Duration(n)).Round(time.Millisecond))
	if tcMode(t) == "clsact" {
		// Every earlier cycle's filters were replaced, and their
		// programs freed; the last cycle's are still there.
		waitReleased(t, ours.minus(last))
		if progs := netdevFilters(t, ns, veths...); len(progs) != 2*len(veths) || !all(progs, last.progs) {
			t.Fatalf("after the last cycle's SIGKILL, netdev's filters run programs %v, want 2 per veth of the last cycle's %v", progs, last)
		}
		testenv.Sh(t, "ip", "-n", ns, "link", "del", veths[0])
	}
	waitReleased(t, ours)
}

func checkExit(ps interface{ Sys() any }, sig syscall.Signal) error {
	ws, ok := ps.Sys().(syscall.WaitStatus)
	if !ok {
		return fmt.Errorf("no wait status: %v", ps)
	}
	switch sig {
	case syscall.SIGKILL:
		if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			return fmt.Errorf("want death by SIGKILL, got %v", ps)
		}
	default:
		if !ws.Exited() || ws.ExitStatus() != 0 {
			return fmt.Errorf("want exit status 0 after %v, got %v", sig, ps)
		}
	}
	return nil
}
