package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf/rlimit"

	"github.com/ktel-dev/ktel/bpf/lb"
	ctl "github.com/ktel-dev/ktel/internal/lb"
)

// Configurations, in the order of the tables.
const (
	cfgDirect = "direct"
	cfgKtel   = "ktel lb"
	cfgKtel1  = "ktel lb, 1 service" // reference: a second probe that always has one service
	cfgNft    = "iptables-nft"
	cfgLegacy = "iptables-legacy"
)

func iptCfg(backend string) string { return "iptables-" + backend }

// nResult is what was measured for one number of services.
type nResult struct {
	n       int
	lat     map[string][]int64   // connect+close durations, all rounds pooled
	rounds  map[string][]float64 // median of each round, ns
	errors  map[string]map[string]int
	apply   map[string]time.Duration // nft, legacy: restore; "ktel load", "ktel maps"
	skipped map[string]string        // config -> why it has no figures
}

func run(ctx context.Context, o options, log *slog.Logger) error {
	began := time.Now()
	deadline := began.Add(o.maxTime)
	if err := rlimit.RemoveMemlock(); err != nil {
		log.Warn("remove memlock rlimit", "err", err)
	}
	// The benchmark's own threads (listeners, iptables-restore, ktel's
	// control plane) stay off the clients' CPU.
	if err := pinAll(o.serverCPU); err != nil {
		return err
	}

	var notes []string
	var backends []string
	for _, b := range o.backends {
		if _, err := exec.LookPath("iptables-" + b + "-restore"); err != nil {
			notes = append(notes, fmt.Sprintf("%s: not installed (%v)", iptCfg(b), err))
			continue
		}
		backends = append(backends, b)
	}
	e, err := newEnv(append([]string{"lb"}, backends...), o.endpoints)
	if err != nil {
		return fmt.Errorf("set up: %w", err)
	}
	defer e.Close()

	life := o.maxTime + 5*time.Minute
	clients := map[string]*client{}
	cfgs := []string{cfgDirect, cfgKtel}
	start := func(cfg, role, cg string) error {
		c, err := e.startClient(cfg, role, cg, o.clientCPU, life)
		clients[cfg] = c
		return err
	}
	if err := start(cfgDirect, "lb", e.cgPlain); err != nil {
		return err
	}
	if err := start(cfgKtel, "lb", e.cgLB); err != nil {
		return err
	}
	if err := start(cfgKtel1, "lb", e.cgLB1); err != nil {
		return err
	}
	cfgs = append(cfgs, cfgKtel1)
	for _, b := range backends {
		if err := start(iptCfg(b), b, e.cgPlain); err != nil {
			return err
		}
		cfgs = append(cfgs, iptCfg(b))
	}

	// The safety net holds: in namespace lb, before anything rewrites it,
	// a connect to a VIP cannot go anywhere.
	resp, err := clients[cfgKtel].do(ctx, request{Addr: vipAddr(0).String(), N: 3, TimeoutMS: 5000})
	if err != nil {
		return err
	}
	if len(resp.LatNS) != 0 || resp.Errors["ENETUNREACH"] != 3 {
		return fmt.Errorf("namespace %s: a connect to %s without the load balancer gave %d successes, errors %v; want ENETUNREACH", e.ns["lb"], vipAddr(0), len(resp.LatNS), resp.Errors)
	}

	maxN := o.services[len(o.services)-1]
	// The reference probe stays loaded with one service for the whole
	// run, so that every N also measures ktel(N) against ktel(1) side by
	// side, not minutes apart.
	ref, _, err := loadKtel(e, "services1.json", e.cgLB1, 1, maxN, o.endpoints, log)
	if err != nil {
		return err
	}
	defer ref.Close()

	machine := describeMachine(backends)
	fmt.Printf("%s\n", machine)
	fmt.Printf("%d endpoints per service; %d measured connects per configuration and number of services, in %d interleaved rounds (+%d warm-up each); clients on CPU %d\n\n",
		o.endpoints, o.connects, o.rounds, o.warmup, o.clientCPU)

	var results []*nResult
	disabled := map[string]string{} // iptables backend -> why
	for _, n := range o.services {
		if ctx.Err() != nil {
			notes = append(notes, fmt.Sprintf("N=%d and above: not measured (interrupted)", n))
			break
		}
		if time.Now().After(deadline) {
			notes = append(notes, fmt.Sprintf("N=%d and above: not measured (-max-time %v reached)", n, o.maxTime))
			break
		}
		r, err := measureN(ctx, e, o, n, maxN, cfgs, clients, backends, disabled, log)
		if r != nil {
			results = append(results, r)
			printN(r, cfgs)
		}
		if err != nil {
			if ctx.Err() != nil {
				notes = append(notes, fmt.Sprintf("N=%d: interrupted", n))
				break
			}
			return err
		}
	}
	for b, why := range disabled {
		notes = append(notes, fmt.Sprintf("%s: %s", iptCfg(b), why))
	}
	slices.Sort(notes)

	fmt.Println()
	report(os.Stdout, results, cfgs, notes, time.Since(began))
	if o.svg != "" && len(results) > 0 {
		if err := writeChart(o.svg, results, cfgs, machine); err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		fmt.Printf("\nchart: %s\n", o.svg)
	}
	return nil
}

// measureN applies n services to every configuration, checks that each
// reaches a backend through the last service, and measures all of them
// round by round.
func measureN(ctx context.Context, e *env, o options, n, maxN int, cfgs []string, clients map[string]*client,
	backends []string, disabled map[string]string, log *slog.Logger) (*nResult, error) {
	r := &nResult{n: n, lat: map[string][]int64{}, rounds: map[string][]float64{}, errors: map[string]map[string]int{},
		apply: map[string]time.Duration{}, skipped: map[string]string{}}
	fmt.Fprintf(os.Stderr, "N=%d: applying\n", n)

	// iptables: from an empty nat table, one restore of the whole ruleset.
	rules := filepath.Join(e.tmp, "rules")
	empty := filepath.Join(e.tmp, "empty")
	if err := os.WriteFile(empty, []byte(emptyNat), 0o600); err != nil {
		return nil, err
	}
	f, err := os.Create(rules)
	if err != nil {
		return nil, err
	}
	err = writeKubeRules(f, n, o.endpoints)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	for _, b := range backends {
		cfg := iptCfg(b)
		if why, off := disabled[b]; off {
			r.skipped[cfg] = why
			continue
		}
		if _, err := restore(ctx, b, e.ns[b], empty, e.tmp, o.restoreTimeout); err != nil {
			return r, err
		}
		took, err := restore(ctx, b, e.ns[b], rules, e.tmp, o.restoreTimeout)
		if err != nil {
			if ctx.Err() != nil {
				return r, ctx.Err()
			}
			disabled[b] = fmt.Sprintf("N=%d and above not measured: %v", n, err)
			r.skipped[cfg] = err.Error()
			// Leave no partial ruleset behind (restores are atomic, but be sure).
			restore(ctx, b, e.ns[b], empty, e.tmp, o.restoreTimeout)
			continue
		}
		r.apply[cfg] = took
	}
	os.Remove(rules)

	// ktel: a fresh probe loaded with the n services.
	p, t, err := loadKtel(e, "services.json", e.cgLB, n, maxN, o.endpoints, log)
	if err != nil {
		return r, err
	}
	defer p.Close()
	r.apply["ktel load"], r.apply["ktel parse"], r.apply["ktel maps"] = t.load, t.parse, t.maps

	// Every configuration must reach the backends; direct connects to
	// the first backend, the others to the last service's VIP.
	last := vipAddr(n - 1)
	target := func(cfg string) netip.AddrPort {
		switch cfg {
		case cfgDirect:
			return backendAddr(0)
		case cfgKtel1:
			return vipAddr(0)
		}
		return last
	}
	var active []string
	for _, cfg := range cfgs {
		if _, off := r.skipped[cfg]; off {
			continue
		}
		resp, err := clients[cfg].do(ctx, request{Addr: target(cfg).String(), N: 10 * o.endpoints, Read: true, TimeoutMS: 30000})
		if err != nil {
			return r, err
		}
		ok := len(resp.Errors) == 0 && len(resp.Backends) > 0
		for b := range resp.Backends {
			if !isBackend(b, o.endpoints) {
				ok = false
			}
		}
		if !ok {
			return r, fmt.Errorf("N=%d %s: check of %s failed: answers %v, errors %v", n, cfg, target(cfg), resp.Backends, resp.Errors)
		}
		active = append(active, cfg)
	}

	fmt.Fprintf(os.Stderr, "N=%d: measuring %v\n", n, active)
	per := o.connects / o.rounds
	// Round -1 is measured like the others and discarded: the first
	// batches after a change (a new probe, a new ruleset) warm caches.
	for round := -1; round < o.rounds; round++ {
		for i := range active {
			cfg := active[(i+max(round, 0))%len(active)]
			resp, err := clients[cfg].do(ctx, request{Addr: target(cfg).String(), N: per, Warmup: o.warmup, TimeoutMS: 60000})
			if err != nil {
				return r, err
			}
			if round < 0 {
				continue
			}
			r.lat[cfg] = append(r.lat[cfg], resp.LatNS...)
			if len(resp.LatNS) > 0 {
				r.rounds[cfg] = append(r.rounds[cfg], percentile(resp.LatNS, 50))
			}
			for k, v := range resp.Errors {
				if r.errors[cfg] == nil {
					r.errors[cfg] = map[string]int{}
				}
				r.errors[cfg][k] += v
			}
		}
	}

	// The load balancer did what was timed: the last service counted
	// every connect, and the datapath had no failures.
	snap, err := p.Snapshot()
	if err != nil {
		return r, err
	}
	var lastConns uint64
	for _, s := range snap.Services {
		if s.Name == svcName(n-1) {
			lastConns = s.Connections
		}
	}
	if want := uint64(len(r.lat[cfgKtel])); lastConns < want {
		return r, fmt.Errorf("lb counted %d connects to %s, fewer than the %d timed", lastConns, svcName(n-1), want)
	}
	if d := snap.ReverseFailed + snap.SlotMissing + snap.MaglevMissing; d > 0 {
		return r, fmt.Errorf("lb datapath errors: reverse %d, slot %d, maglev %d", snap.ReverseFailed, snap.SlotMissing, snap.MaglevMissing)
	}
	return r, nil
}

type ktelTimes struct{ load, parse, maps time.Duration }

// loadKtel writes a services file of n services and loads a probe with it
// on cgroup cg. Maps are sized for maxN services, whatever n, so that
// only the number of entries varies. The file is also parsed once on its
// own, to show how much of Load is parsing.
func loadKtel(e *env, name, cg string, n, maxN, endpoints int, log *slog.Logger) (*lb.Probe, ktelTimes, error) {
	var t ktelTimes
	svcs := make([]ctl.Service, n)
	for i := range svcs {
		svcs[i] = ctl.Service{Name: svcName(i), VIP: vipAddr(i), Protocol: ctl.TCP}
		for j := range endpoints {
			svcs[i].Backends = append(svcs[i].Backends, ctl.Backend{Addr: backendAddr(j), Weight: 1})
		}
	}
	data, err := ctl.Marshal(svcs)
	if err != nil {
		return nil, t, err
	}
	file := filepath.Join(e.tmp, name)
	if err := os.WriteFile(file, data, 0o600); err != nil {
		return nil, t, err
	}
	t0 := time.Now()
	if _, err := ctl.Parse(file, data); err != nil {
		return nil, t, err
	}
	t.parse = time.Since(t0)
	t0 = time.Now()
	p, err := lb.Load(lb.Options{
		Cgroup:       cg,
		ServicesFile: file,
		MaxServices:  max(maxN, lb.DefaultMaxServices),
		MaxBackends:  max(maxN*endpoints, lb.DefaultMaxBackends),
	}, log)
	if err != nil {
		return nil, t, fmt.Errorf("load lb with %d services: %w", n, err)
	}
	t.load = time.Since(t0)
	snap, err := p.Snapshot()
	if err != nil {
		p.Close()
		return nil, t, err
	}
	t.maps = snap.LastApply
	if len(snap.Services) != n {
		p.Close()
		return nil, t, fmt.Errorf("lb: %d services applied, want %d", len(snap.Services), n)
	}
	return p, t, nil
}

func isBackend(s string, endpoints int) bool {
	for j := range endpoints {
		if s == backendAddr(j).String() {
			return true
		}
	}
	return false
}
