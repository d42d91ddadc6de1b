package daemon

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ktel-dev/ktel/bpf/lb"
	"github.com/ktel-dev/ktel/bpf/netdev"
	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/caps"
	"github.com/ktel-dev/ktel/internal/config"
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
type eventSource interface {
	Events() *ebpf.Map
	decoder() tracing.Decoder
}

// env is what starters get: the configuration, a logger scoped to the
// probe, the exemplar store, and whether spans are exported at all.
type env struct {
	cfg       *config.Config
	log       *slog.Logger
	exemplars *metrics.Exemplars
	spans     bool
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

// needs are the capabilities each probe needs to load and attach (measured
// with setpriv: tracing programs need CAP_PERFMON, netdev's packet parsing
// too, attaching to interfaces and cgroups CAP_NET_ADMIN), and keeps what
// it still needs once running.
var needs = map[string]struct{ load, keep []caps.Cap }{
	"syscall":    {load: []caps.Cap{caps.BPF, caps.Perfmon}},
	"runqlat":    {load: []caps.Cap{caps.BPF, caps.Perfmon}},
	"tcpretrans": {load: []caps.Cap{caps.BPF, caps.Perfmon}},
	// Interfaces that appear later are attached, and clsact filters removed
	// on exit.
	"netdev": {load: []caps.Cap{caps.BPF, caps.Perfmon, caps.NetAdmin}, keep: []caps.Cap{caps.BPF, caps.Perfmon, caps.NetAdmin}},
	// A reload creates Maglev tables (maps).
	"lb": {load: []caps.Cap{caps.BPF, caps.NetAdmin}, keep: []caps.Cap{caps.BPF}},
}

// ErrMissingCapability marks a probe ktel lacks the privileges to load.
var ErrMissingCapability = errors.New("missing capability")

// starters load and attach each probe by name (config.Probes). Adding a
// probe is a folder under bpf/, a collector in metrics/ and a line here.
var starters = map[string]starter{
	"syscall":    startSyscall,
	"runqlat":    startRunqlat,
	"tcpretrans": startTCPRetrans,
	"netdev":     startNetdev,
	"lb":         startLB,
}

type syscallProbe struct {
	*sysprobe.Probe
	*metrics.SyscallCollector // a FamilyCollector
}

func (syscallProbe) decoder() tracing.Decoder { return tracing.SyscallDecoder(sysprobe.NativeName) }

func startSyscall(e env) (loaded, error) {
	p, err := sysprobe.Load(sysprobe.Options{
		Schema: e.cfg.HistogramSchema,
		Hook:   probe.Hook(e.cfg.SyscallHook),
		Spans:  e.spanOptions(e.cfg.SyscallSpanThreshold),
	}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "variant", p.Variant().String())
	return syscallProbe{p, metrics.NewSyscallCollector(p, sysprobe.NativeName, e.exemplars)}, nil
}

type runqlatProbe struct {
	*runqlat.Probe
	metrics.Collector
}

func (runqlatProbe) decoder() tracing.Decoder { return tracing.RunqlatDecoder }

func startRunqlat(e env) (loaded, error) {
	p, err := runqlat.Load(runqlat.Options{
		Schema: e.cfg.HistogramSchema,
		Hook:   probe.Hook(e.cfg.RunqlatHook),
		Spans:  e.spanOptions(e.cfg.RunqlatSpanThreshold),
	}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "variant", p.Variant().String())
	return runqlatProbe{p, metrics.NewRunqlatCollector(p, e.cfg.RunqlatPerCPU, e.exemplars)}, nil
}

type tcpretransProbe struct {
	*tcpretrans.Probe
	metrics.Collector
}

func (tcpretransProbe) decoder() tracing.Decoder { return tracing.TCPRetransDecoder }

func startTCPRetrans(e env) (loaded, error) {
	var spans probe.SpanOptions
	if e.spans && e.cfg.TCPRetransSpans {
		spans = probe.SpanOptions{Always: true, Rate: e.cfg.SpanRateLimit}
	}
	p, err := tcpretrans.Load(tcpretrans.Options{Peers: e.cfg.TCPRetransPeers, MaxPeers: e.cfg.TCPRetransMaxPeers, Spans: spans}, e.log)
	if err != nil {
		return nil, err
	}
	e.log.Info("probe attached", "variant", p.Variant().String())
	return tcpretransProbe{p, metrics.NewTCPRetransCollector(p, e.cfg.TCPRetransPeers, e.cfg.TCPRetransMaxPeers)}, nil
}

type netdevProbe struct {
	*netdev.Probe
	metrics.Collector
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
	return netdevProbe{p, metrics.NewNetdevCollector(p)}, nil
}

type lbProbe struct {
	*lb.Probe
	metrics.Collector
}

func startLB(e env) (loaded, error) {
	p, err := lb.Load(lb.Options{
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
	e.log.Info("probe attached", "cgroup", p.Cgroup(), "no_backend_errno", p.RefuseErrno())
	return lbProbe{p, metrics.NewLBCollector(p)}, nil
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
	need := needs[name].load
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
