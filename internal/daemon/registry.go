package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/bpf/lb"
	"github.com/ktel-dev/ktel/bpf/netdev"
	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/caps"
	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/config"
	lbctl "github.com/ktel-dev/ktel/internal/lb"
	"github.com/ktel-dev/ktel/internal/podnet"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/metrics"
	"github.com/ktel-dev/ktel/tracing"
)

// loaded is a probe in the kernel together with its collector.
type loaded interface {
	metrics.Collector
	metrics.BPFObjects
	io.Closer
}

// detacher is a loaded probe that can detach its programs before its maps
// are released.
type detacher interface{ Detach() error }

// eventSource is a loaded probe that emits outlier events.
type eventSource interface{ Events() *ebpf.Map }

// env is what starters get: the configuration, a logger scoped to the
// probe, the exemplar store, and whether spans are exported at all.
type env struct {
	cfg       *config.Config
	log       *slog.Logger
	exemplars *metrics.Exemplars
	spans     bool
	// workloads names cgroups when workload attribution is on; nil: off.
	workloads metrics.Workloads
	// pods are this node's pods' addresses, with workload attribution.
	pods podnet.Pods
}

// spanOptions enables outlier events above threshold when spans are on.
func (e env) spanOptions(threshold time.Duration) probe.SpanOptions {
	if !e.spans || threshold <= 0 {
		return probe.SpanOptions{}
	}
	return probe.SpanOptions{Threshold: threshold, Rate: e.cfg.SpanRateLimit}
}

// starter loads and attaches one probe.
type starter func(env) (loaded, error)

// ErrMissingCapability marks a probe ktel lacks the privileges to load.
var ErrMissingCapability = errors.New("missing capability")

// registration is everything ktel knows of one probe, in one place, as
// node_exporter registers its collectors: its name, default and help, the
// validation of its own variables (config.Probe), the capabilities it
// needs, how it starts (load, attach, collector), and how its outlier
// events become spans. Adding a probe is a folder under bpf/, a collector
// in metrics/ and an entry in registry.
type registration struct {
	config.Probe
	// load are the capabilities the probe needs to load and attach
	// (measured with setpriv: tracing programs need CAP_PERFMON, netdev's
	// packet parsing too, attaching to interfaces and cgroups
	// CAP_NET_ADMIN); keep what it still needs once running.
	load, keep []caps.Cap
	start      starter
	decoder    tracing.Decoder // of its events; nil if it has none
}

// registry lists every probe, in the order they start.
var registry = []registration{
	{
		Probe: config.Probe{Name: "syscall", Default: true, Help: "per-syscall latency histograms and error counts",
			Validate: func(c *config.Config, _ bool) []error {
				return slices.Concat(validHook("KTEL_SYSCALL_HOOK", c.SyscallHook), validThreshold("KTEL_SYSCALL_SPAN_THRESHOLD", c.SyscallSpanThreshold), validSyscallTiming(c))
			}},
		load:    []caps.Cap{caps.BPF, caps.Perfmon},
		start:   startSyscall,
		decoder: tracing.SyscallDecoder(sysprobe.NativeName),
	},
	{
		Probe: config.Probe{Name: "runqlat", Default: true, Help: "run-queue (scheduler) delay histogram",
			Validate: func(c *config.Config, _ bool) []error {
				return append(validHook("KTEL_RUNQLAT_HOOK", c.RunqlatHook), validThreshold("KTEL_RUNQLAT_SPAN_THRESHOLD", c.RunqlatSpanThreshold)...)
			}},
		load:    []caps.Cap{caps.BPF, caps.Perfmon},
		start:   startRunqlat,
		decoder: tracing.RunqlatDecoder,
	},
	{
		Probe: config.Probe{Name: "tcpretrans", Default: true, Help: "TCP retransmits by family, state and kind (optionally by peer)",
			Validate: validTCPRetrans},
		load:    []caps.Cap{caps.BPF, caps.Perfmon},
		start:   startTCPRetrans,
		decoder: tracing.TCPRetransDecoder,
	},
	{
		Probe: config.Probe{Name: "netdev", Default: false, Help: "per-interface packet and byte counters (needs KTEL_INTERFACES)",
			Input:    func(c *config.Config) bool { return strings.Trim(c.Interfaces, " ,") != "" },
			Validate: validNetdev},
		load: []caps.Cap{caps.BPF, caps.Perfmon, caps.NetAdmin},
		// Interfaces that appear later are attached, and clsact filters
		// removed on exit.
		keep:  []caps.Cap{caps.BPF, caps.Perfmon, caps.NetAdmin},
		start: startNetdev,
	},
	{
		Probe: config.Probe{Name: "lb", Default: false, Help: "socket-level service load balancer (needs KTEL_LB_SERVICES_FILE or KTEL_LB_SOURCE=kubernetes)",
			Input:    func(c *config.Config) bool { return c.LBServicesFile != "" || c.LBSource == "kubernetes" },
			Validate: validLB},
		load:  []caps.Cap{caps.BPF, caps.NetAdmin},
		keep:  []caps.Cap{caps.BPF}, // a reload creates Maglev tables (maps)
		start: startLB,
	},
}

// Probes are the registered probes as the configuration sees them, for
// config.Load and ktel --help.
func Probes() []config.Probe {
	out := make([]config.Probe, len(registry))
	for i, r := range registry {
		out[i] = r.Probe
	}
	return out
}

// lookup returns the registration of probe name.
func lookup(name string) (registration, bool) {
	i := slices.IndexFunc(registry, func(r registration) bool { return r.Name == name })
	if i < 0 {
		return registration{}, false
	}
	return registry[i], true
}

// starters returns the start function of every registered probe by name;
// tests replace some.
func starters() map[string]starter {
	m := map[string]starter{}
	for _, r := range registry {
		m[r.Name] = r.start
	}
	return m
}

func validHook(name, hook string) []error {
	if !config.OneOf(hook, string(probe.HookAuto), string(probe.HookBTF), string(probe.HookRaw), string(probe.HookTracepoint)) {
		return []error{config.Invalid(name, hook, "")}
	}
	return nil
}

// validSyscallTiming checks the KTEL_SYSCALL_TIMING block. The list and
// the cgroups are checked whatever the mode, so that a typo shows before
// the mode is switched.
func validSyscallTiming(c *config.Config) []error {
	var errs []error
	if !config.OneOf(c.SyscallTiming, string(sysprobe.TimeSample), string(sysprobe.TimeAll), string(sysprobe.TimeList), string(sysprobe.TimeCgroup)) {
		errs = append(errs, config.Invalid("KTEL_SYSCALL_TIMING", c.SyscallTiming, ""))
	}
	if c.SyscallSampleRate < 1 || c.SyscallSampleRate > 1<<30 {
		errs = append(errs, config.Invalid("KTEL_SYSCALL_SAMPLE_RATE", strconv.Itoa(c.SyscallSampleRate), "out of range"))
	}
	if nrs, err := syscallNumbers(c.SyscallList); err != nil {
		errs = append(errs, config.Invalid("KTEL_SYSCALL_LIST", c.SyscallList, err.Error()))
	} else if len(nrs) == 0 && c.SyscallTiming == string(sysprobe.TimeList) {
		errs = append(errs, config.Invalid("KTEL_SYSCALL_LIST", c.SyscallList, "KTEL_SYSCALL_TIMING=list but no syscall is named"))
	}
	if ids, err := cgroupIDs(c.SyscallCgroups); err != nil {
		errs = append(errs, config.Invalid("KTEL_SYSCALL_CGROUPS", c.SyscallCgroups, err.Error()))
	} else if len(ids) == 0 && c.SyscallTiming == string(sysprobe.TimeCgroup) {
		errs = append(errs, config.Invalid("KTEL_SYSCALL_CGROUPS", c.SyscallCgroups, "KTEL_SYSCALL_TIMING=cgroup but no cgroup is named"))
	}
	if c.SyscallPerContainer && c.Workloads() == config.WorkloadsOff {
		errs = append(errs, config.Invalid("KTEL_SYSCALL_PER_CONTAINER", "true",
			"needs workload attribution: set KTEL_NODE_NAME (with KTEL_WORKLOAD_ATTRIBUTION=auto) or KTEL_WORKLOAD_ATTRIBUTION=cgroup"))
	}
	return errs
}

// listItems splits a comma-separated list, dropping empty items.
func listItems(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' })
}

// syscallNumbers are the numbers of the syscalls named in list.
func syscallNumbers(list string) ([]uint32, error) {
	var out []uint32
	for _, name := range listItems(list) {
		nr, ok := sysprobe.NativeNumber(name)
		if !ok {
			return nil, fmt.Errorf("unknown syscall %q", name)
		}
		if nr >= sysprobe.MaxSyscalls {
			return nil, fmt.Errorf("syscall %q numbered %d, not below %d", name, nr, sysprobe.MaxSyscalls)
		}
		out = append(out, nr)
	}
	return out, nil
}

// cgroupIDs are the ids of the cgroup v2 directories in list.
func cgroupIDs(list string) ([]uint64, error) {
	var out []uint64
	for _, dir := range listItems(list) {
		if !config.IsFS(dir, unix.CGROUP2_SUPER_MAGIC) {
			return nil, fmt.Errorf("%s: not a directory of a cgroup v2 hierarchy", dir)
		}
		id, err := cgroups.ID(dir)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", dir, err)
		}
		out = append(out, id)
	}
	if len(out) > sysprobe.MaxCgroups {
		return nil, fmt.Errorf("%d cgroups, more than %d", len(out), sysprobe.MaxCgroups)
	}
	return out, nil
}

func validThreshold(name string, d time.Duration) []error {
	if d < 0 {
		return []error{config.Invalid(name, d.String(), "negative")}
	}
	return nil
}

func validTCPRetrans(c *config.Config, _ bool) []error {
	if c.TCPRetransMaxPeers < 1 || c.TCPRetransMaxPeers > tcpretrans.PeerLimit {
		return []error{config.Invalid("KTEL_TCPRETRANS_MAX_PEERS", strconv.Itoa(c.TCPRetransMaxPeers), "out of range")}
	}
	return nil
}

func validNetdev(c *config.Config, enabled bool) []error {
	var errs []error
	bad := func(name, value, reason string) { errs = append(errs, config.Invalid(name, value, reason)) }
	ifaces, err := netdev.ParseInterfaces(c.Interfaces)
	switch {
	case err != nil && c.Interfaces != "":
		bad("KTEL_INTERFACES", c.Interfaces, err.Error())
	case err == nil && len(ifaces) == 0 && enabled:
		bad("KTEL_INTERFACES", c.Interfaces, "the netdev probe is enabled but no interface is named")
	}
	if !config.OneOf(c.NetdevHook, "tc", "xdp") {
		bad("KTEL_NETDEV_HOOK", c.NetdevHook, "")
	}
	if !config.OneOf(c.NetdevTCMode, "auto", "tcx", "clsact") {
		bad("KTEL_NETDEV_TC_MODE", c.NetdevTCMode, "")
	}
	if c.NetdevMaxInterfaces < 1 || c.NetdevMaxInterfaces > 65536 {
		bad("KTEL_NETDEV_MAX_INTERFACES", strconv.Itoa(c.NetdevMaxInterfaces), "out of range")
	}
	if c.NetdevNetNS != "" && !config.IsFS(c.NetdevNetNS, unix.NSFS_MAGIC) {
		bad("KTEL_NETDEV_NETNS", c.NetdevNetNS, "not a network namespace file (such as /var/run/netns/NAME)")
	}
	return errs
}

func validLB(c *config.Config, enabled bool) []error {
	var errs []error
	bad := func(name, value, reason string) { errs = append(errs, config.Invalid(name, value, reason)) }
	// The services file is read only when lb runs: a file left named in
	// the environment of a node that does not balance does not stop ktel.
	switch {
	case !config.OneOf(c.LBSource, "file", "kubernetes"):
		bad("KTEL_LB_SOURCE", c.LBSource, "")
	case c.LBSource == "kubernetes" && enabled && c.LBServicesFile != "":
		bad("KTEL_LB_SERVICES_FILE", c.LBServicesFile, "KTEL_LB_SOURCE=kubernetes: the services come from the API server, not a file")
	case c.LBSource == "kubernetes" && enabled:
		if reason := kubeconfigProblem(); reason != "" {
			bad("KTEL_LB_SOURCE", c.LBSource, reason)
		}
	case c.LBSource == "kubernetes":
	case enabled && c.LBServicesFile == "":
		bad("KTEL_LB_SERVICES_FILE", c.LBServicesFile, "the lb probe is enabled but no services file is named")
	case enabled:
		if data, err := os.ReadFile(c.LBServicesFile); err != nil {
			bad("KTEL_LB_SERVICES_FILE", c.LBServicesFile, err.Error())
		} else if svcs, err := lbctl.Parse(c.LBServicesFile, data); err != nil {
			bad("KTEL_LB_SERVICES_FILE", c.LBServicesFile, err.Error())
		} else {
			backends := 0
			for _, s := range svcs {
				backends += len(s.Backends)
			}
			if len(svcs) > c.LBMaxServices {
				bad("KTEL_LB_SERVICES_FILE", c.LBServicesFile, fmt.Sprintf("%d services, more than KTEL_LB_MAX_SERVICES=%d", len(svcs), c.LBMaxServices))
			}
			if backends > c.LBMaxBackends {
				bad("KTEL_LB_SERVICES_FILE", c.LBServicesFile, fmt.Sprintf("%d backends, more than KTEL_LB_MAX_BACKENDS=%d", backends, c.LBMaxBackends))
			}
		}
	}
	if c.LBCgroup != "" && !config.IsFS(c.LBCgroup, unix.CGROUP2_SUPER_MAGIC) {
		bad("KTEL_LB_CGROUP", c.LBCgroup, "not a directory of a cgroup v2 hierarchy")
	}
	if !config.OneOf(c.LBAlgorithm, "random", "maglev") {
		bad("KTEL_LB_ALGORITHM", c.LBAlgorithm, "")
	}
	if !slices.Contains(lbctl.MaglevSizes, c.LBMaglevTableSize) {
		bad("KTEL_LB_MAGLEV_TABLE_SIZE", strconv.Itoa(c.LBMaglevTableSize), "not one of the primes")
	}
	for name, v := range map[string]int{"KTEL_LB_MAX_SERVICES": c.LBMaxServices, "KTEL_LB_MAX_BACKENDS": c.LBMaxBackends, "KTEL_LB_MAX_SOCKETS": c.LBMaxSockets} {
		if v < 1 || v > 1<<24 {
			bad(name, strconv.Itoa(v), "out of range")
		}
	}
	return errs
}

type syscallProbe struct {
	*sysprobe.Probe
	*metrics.SyscallCollector
}

func startSyscall(e env) (loaded, error) {
	// Validated with the rest of the configuration (validSyscallTiming).
	nrs, err := syscallNumbers(e.cfg.SyscallList)
	if err != nil {
		return nil, err
	}
	cgroups, err := cgroupIDs(e.cfg.SyscallCgroups)
	if err != nil {
		return nil, err
	}
	// Validated to need workload attribution; workloads is nil
	// nonetheless on a host without cgroup v2 (startWorkloads logs it).
	perContainer := e.cfg.SyscallPerContainer && e.workloads != nil
	if e.cfg.SyscallPerContainer && !perContainer {
		e.log.Warn("KTEL_SYSCALL_PER_CONTAINER is ignored: workload attribution is unavailable; syscall latency stays by syscall")
	}
	p, err := sysprobe.Load(sysprobe.Options{
		Schema:     e.cfg.HistogramSchema,
		Hook:       probe.Hook(e.cfg.SyscallHook),
		Spans:      e.spanOptions(e.cfg.SyscallSpanThreshold),
		Timing:     sysprobe.Timing(e.cfg.SyscallTiming),
		SampleRate: uint32(e.cfg.SyscallSampleRate),
		Syscalls:   nrs,
		Cgroups:    cgroups,
		PerCgroup:  perContainer,
	}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "variant", p.Variant().String(), "timing", e.cfg.SyscallTiming, "per_container", perContainer)
	if perContainer {
		return syscallProbe{p, metrics.NewSyscallWorkloadCollector(p, p, sysprobe.NativeName, e.workloads, e.cfg.WorkloadLabelTTL)}, nil
	}
	return syscallProbe{p, metrics.NewSyscallCollector(p, sysprobe.NativeName, e.exemplars)}, nil
}

type runqlatProbe struct {
	*runqlat.Probe
	metrics.Collector
}

func startRunqlat(e env) (loaded, error) {
	p, err := runqlat.Load(runqlat.Options{
		Schema: e.cfg.HistogramSchema,
		Hook:   probe.Hook(e.cfg.RunqlatHook),
		Spans:  e.spanOptions(e.cfg.RunqlatSpanThreshold),
		// Per workload replaces per CPU.
		PerCgroup: e.workloads != nil,
	}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "variant", p.Variant().String(), "per_workload", e.workloads != nil)
	if e.workloads != nil {
		if e.cfg.RunqlatPerCPU {
			e.log.Warn("KTEL_RUNQLAT_PER_CPU is ignored with workload attribution (KTEL_WORKLOAD_ATTRIBUTION): the histogram is per workload")
		}
		return runqlatProbe{p, metrics.NewRunqlatWorkloadCollector(p, p, e.workloads, e.cfg.WorkloadLabelTTL, e.exemplars)}, nil
	}
	return runqlatProbe{p, metrics.NewRunqlatCollector(p, e.cfg.RunqlatPerCPU, e.exemplars)}, nil
}

type tcpretransProbe struct {
	*tcpretrans.Probe
	metrics.Collector
}

func startTCPRetrans(e env) (loaded, error) {
	var spans probe.SpanOptions
	if e.spans && e.cfg.TCPRetransSpans {
		spans = probe.SpanOptions{Always: true, Rate: e.cfg.SpanRateLimit}
	}
	// By peer or by pod: peers, asked for explicitly, win.
	perPod := e.workloads != nil && !e.cfg.TCPRetransPeers
	if e.workloads != nil && !perPod {
		e.log.Warn("retransmits are counted by peer (KTEL_TCPRETRANS_PEERS=true), not by pod")
	}
	p, err := tcpretrans.Load(tcpretrans.Options{Peers: e.cfg.TCPRetransPeers, MaxPeers: e.cfg.TCPRetransMaxPeers, Spans: spans, PerCgroup: perPod}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "variant", p.Variant().String(), "per_pod", perPod)
	if perPod {
		return tcpretransProbe{p, metrics.NewTCPRetransWorkloadCollector(p, p, e.workloads, e.cfg.WorkloadLabelTTL)}, nil
	}
	return tcpretransProbe{p, metrics.NewTCPRetransCollector(p, e.cfg.TCPRetransPeers, e.cfg.TCPRetransMaxPeers)}, nil
}

type netdevProbe struct {
	*netdev.Probe
	metrics.Collector
	stopPods func() // stops labelling interfaces with pods; nil: none
}

func (p netdevProbe) Close() error {
	if p.stopPods != nil {
		p.stopPods()
	}
	return p.Probe.Close()
}

func startNetdev(e env) (loaded, error) {
	ifaces, err := netdev.ParseInterfaces(e.cfg.Interfaces)
	if err != nil {
		return nil, err
	}
	p, err := netdev.Load(netdev.Options{
		Interfaces:    ifaces,
		Hook:          netdev.Hook(e.cfg.NetdevHook),
		TC:            netdev.TCMode(e.cfg.NetdevTCMode),
		MaxInterfaces: e.cfg.NetdevMaxInterfaces,
		PacketSizes:   e.cfg.NetdevPacketSizes,
		NetNS:         e.cfg.NetdevNetNS,
	}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "interfaces", p.Interfaces())
	if e.pods == nil {
		return netdevProbe{p, metrics.NewNetdevCollector(p, nil), nil}, nil
	}
	pods, stop := netdevPods(e, p)
	return netdevProbe{p, metrics.NewNetdevCollector(p, pods), stop}, nil
}

// netdevPods labels the interfaces of netdev's namespace that are pods'
// veths with their pods (podnet), until stop. Without netlink there, the
// series keep the labels with empty values.
func netdevPods(e env, p *netdev.Probe) (metrics.NetdevPods, func()) {
	n, err := podnet.OpenNetlink(e.cfg.NetdevNetNS)
	if err != nil {
		e.log.Warn("interfaces are not labelled with their pods", "err", err)
		return noPods{}, nil
	}
	m := podnet.NewMapper(n, e.pods, e.log.With("component", "podnet"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.Run(ctx, p.Changes())
	}()
	return m, func() {
		cancel()
		<-done
		n.Close()
	}
}

type noPods struct{}

func (noPods) PodOf(int) (string, string) { return "", "" }

type lbProbe struct {
	*lb.Probe
	metrics.Collector
}

func startLB(e env) (_ loaded, err error) {
	src, srcMetrics, err := lbSource(e) // lbkube.go
	if err != nil {
		return nil, err
	}
	// Load closes the source only if it fails past checking its options
	// (and a panic skips that): closed here too, Close being idempotent.
	defer func() {
		if err != nil && src != nil {
			_ = src.Close()
		}
	}()
	p, err := lb.Load(lb.Options{
		Source:       src,
		Cgroup:       e.cfg.LBCgroup,
		ServicesFile: e.cfg.LBServicesFile,
		MaxServices:  e.cfg.LBMaxServices,
		MaxBackends:  e.cfg.LBMaxBackends,
		MaxSockets:   e.cfg.LBMaxSockets,
		Algorithm:    e.cfg.LBAlgorithm,
		MaglevSize:   e.cfg.LBMaglevTableSize,
	}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "cgroup", p.Cgroup(), "no_backend_errno", p.RefuseErrno(), "udp_close", p.UDPCloseMode())
	return lbProbe{p, withSource(metrics.NewLBCollector(p), srcMetrics)}, nil
}

// start loads one probe, first checking that ktel holds the capabilities
// it needs, so that a missing one is named rather than reported as EPERM.
// A panic while loading (a program object that does not match its
// loader, say) fails this probe only.
func start(starters map[string]starter, name string, e env) (l loaded, err error) {
	defer func() {
		if r := recover(); r != nil {
			l, err = nil, fmt.Errorf("loading panicked: %v\n%s", r, debug.Stack())
		}
	}()
	s, ok := starters[name]
	if !ok {
		return nil, fmt.Errorf("no probe %q", name)
	}
	r, _ := lookup(name)
	need := slices.Clone(r.load)
	if name == "netdev" && e.cfg.NetdevNetNS != "" {
		need = append(need, caps.SysAdmin) // setns
	}
	if held, err := caps.Effective(); err == nil {
		if missing := held.Missing(need); len(missing) > 0 {
			return nil, fmt.Errorf("%w: probe %s needs %s; ktel has %s", ErrMissingCapability, name, caps.Of(missing...), held)
		}
	}
	return s(e)
}
