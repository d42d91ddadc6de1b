// Command ktel loads eBPF probes and serves what the kernel aggregates as
// Prometheus metrics. Configuration is by environment only: see ktel --help.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cilium/ebpf/rlimit"

	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/daemon"
	"github.com/ktel-dev/ktel/internal/version"
)

// Exit statuses.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := ""
	switch {
	case len(args) == 0:
	case len(args) == 1 && (args[0] == "--help" || args[0] == "-h" || args[0] == "help"):
		usage(stdout)
		return exitOK
	case len(args) == 1 && (args[0] == "--version" || args[0] == "version"):
		v, r, g := version.Info()
		fmt.Fprintf(stdout, "ktel %s (revision %s, %s)\n", v, r, g)
		return exitOK
	case len(args) == 1 && args[0] == "check":
		cmd = "check"
	default:
		fmt.Fprintf(stderr, "ktel: unexpected arguments %q\n\n", args)
		usage(stderr)
		return exitUsage
	}

	cfg, err := config.Load(daemon.Probes())
	if err != nil {
		fmt.Fprintf(stderr, "ktel: configuration error:\n%v\n", err)
		return exitUsage
	}
	log := newLogger(cfg, stderr)
	for _, name := range config.Unknown(os.Environ(), config.PrivilegedTestsVar) {
		log.Warn("ignoring unknown variable; see ktel --help", "variable", name)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		// Kernels since 5.11 charge BPF memory to the cgroup instead.
		log.Debug("cannot remove memlock rlimit", "err", err)
	}

	if cmd == "check" {
		if daemon.Check(cfg, log, stdout) {
			return exitOK
		}
		return exitFailed
	}
	return serve(cfg, log)
}

func serve(cfg *config.Config, log *slog.Logger) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// Before loading: a SIGHUP while the probes load (seconds) would
	// otherwise kill ktel with probes half attached. It is handled once
	// they are.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	ln, err := daemon.Listen(cfg)
	if err != nil {
		log.Error("start", "err", err)
		return exitFailed
	}
	d, err := daemon.New(cfg, log)
	if err != nil {
		ln.Close()
		log.Error("start", "err", err)
		return exitFailed
	}
	served, reloads := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(reloads)
		for {
			select {
			case <-hup:
				log.Info("SIGHUP: reloading")
				d.Reload()
			case <-served:
				return
			}
		}
	}()

	status := exitOK
	if err := d.Serve(ctx, ln); err != nil {
		log.Error("http server", "err", err)
		status = exitFailed
	}
	close(served)
	<-reloads // no reload runs during or after Close
	if err := d.Close(); err != nil {
		log.Error("close probes", "err", err)
		status = exitFailed
	}
	log.Info("stopped")
	return status
}

func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.SlogLevel()}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func usage(w io.Writer) {
	fmt.Fprint(w, `ktel: kernel telemetry from eBPF, served as Prometheus metrics.

Usage:
  ktel            load the probes and serve /metrics until SIGINT/SIGTERM
  ktel check      load and attach every enabled probe, print a verdict per
                  probe, exit 0 only if all loaded
  ktel --version  print the version
  ktel --help     print this help

Configuration is by environment only. An invalid value exits with status 2
before anything is loaded.

`)
	config.Usage(w)
	fmt.Fprintln(w, "\nProbes:")
	for _, p := range daemon.Probes() {
		def := ""
		if p.Default {
			def = " (default)"
		}
		fmt.Fprintf(w, "  %-12s %s%s\n", p.Name, p.Help, def)
	}
}
