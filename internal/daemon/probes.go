package daemon

import (
	"fmt"
	"io"
	"log/slog"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/metrics"
)

// loaded is a probe in the kernel together with its collector.
type loaded interface {
	metrics.Collector
	metrics.BPFObjects
	io.Closer
}

// starter loads and attaches one probe.
type starter func(cfg *config.Config, log *slog.Logger) (loaded, error)

// starters load and attach each probe by name (config.Probes). Adding a
// probe is a folder under bpf/, a collector in metrics/ and a line here.
var starters = map[string]starter{
	"syscall": startSyscall,
	"runqlat": startRunqlat,
}

type syscallProbe struct {
	*sysprobe.Probe
	metrics.Collector
}

func startSyscall(cfg *config.Config, log *slog.Logger) (loaded, error) {
	p, err := sysprobe.Load(sysprobe.Options{
		Schema: cfg.HistogramSchema,
		Hook:   probe.Hook(cfg.SyscallHook),
	}, log)
	if err != nil {
		return nil, err
	}
	log.Info("probe attached", "variant", p.Variant().String())
	return syscallProbe{p, metrics.NewSyscallCollector(p, sysprobe.NativeName, nil)}, nil
}

type runqlatProbe struct {
	*runqlat.Probe
	metrics.Collector
}

func startRunqlat(cfg *config.Config, log *slog.Logger) (loaded, error) {
	p, err := runqlat.Load(runqlat.Options{
		Schema: cfg.HistogramSchema,
		Hook:   probe.Hook(cfg.RunqlatHook),
	}, log)
	if err != nil {
		return nil, err
	}
	log.Info("probe attached", "variant", p.Variant().String())
	return runqlatProbe{p, metrics.NewRunqlatCollector(p, cfg.RunqlatPerCPU, nil)}, nil
}

// start loads one probe, checking that it has a starter.
func start(starters map[string]starter, name string, cfg *config.Config, log *slog.Logger) (loaded, error) {
	s, ok := starters[name]
	if !ok {
		return nil, fmt.Errorf("no probe %q", name)
	}
	return s(cfg, log)
}
