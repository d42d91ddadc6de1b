// Package daemon wires ktel together: it loads the configured probes from
// the probe registry (registry.go: one registration per probe), exports
// them through one Prometheus registry, serves HTTP, and on shutdown
// detaches and closes everything it put into the kernel.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/exporter-toolkit/web"
	"k8s.io/klog/v2"

	"github.com/ktel-dev/ktel/internal/caps"
	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/k8smeta"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/version"
	"github.com/ktel-dev/ktel/metrics"
	"github.com/ktel-dev/ktel/tracing"
)

// Daemon is a running ktel.
type Daemon struct {
	cfg     *config.Config
	log     *slog.Logger
	reg     *prometheus.Registry
	probes  map[string]loaded
	stats   io.Closer         // keeps kernel.bpf_stats_enabled on; nil if off
	tracing *tracing.Pipeline // nil unless an OTLP endpoint is configured
	// workloads names cgroups (nil without workload attribution); it runs
	// until stopWorkloads, and workloadsDone closes when it has stopped.
	workloads     *k8smeta.Resolver
	stopWorkloads context.CancelFunc
	workloadsDone chan struct{}

	// mu serialises Reload and Close: a SIGHUP may arrive while ktel stops.
	mu sync.Mutex
	// gate gathers reg for scrapes; it keeps them off the maps once Close
	// has begun, and Close off them until the scrapes reading them are
	// done.
	gate *gatherGate
}

// gatherGate is a TransactionalGatherer that refuses to gather once closed
// and whose close waits for the gathers in progress. The families a gather
// returned are Go memory: encoding them after close is safe.
type gatherGate struct {
	mu     sync.RWMutex
	closed bool
	g      prometheus.TransactionalGatherer
}

var errClosing = errors.New("ktel is shutting down")

func (g *gatherGate) Gather() ([]*dto.MetricFamily, func(), error) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.closed {
		return nil, func() {}, errClosing
	}
	return g.g.Gather()
}

func (g *gatherGate) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// New loads every enabled probe. A probe that cannot load is logged and
// reported as ktel_probe_up=0; the others run. New fails only if the
// exporter itself cannot be set up.
// Once the probes are attached, it drops the capabilities they no longer
// need.
func New(cfg *config.Config, log *slog.Logger) (*Daemon, error) {
	d, err := newDaemon(cfg, log, starters())
	if err != nil {
		return nil, err
	}
	d.dropCapabilities()
	return d, nil
}

func newDaemon(cfg *config.Config, log *slog.Logger, starters map[string]starter) (*Daemon, error) {
	reg, self := metrics.NewRegistry(version.Info())
	d := &Daemon{cfg: cfg, log: log, reg: reg, probes: map[string]loaded{}}
	exemplars := metrics.NewExemplars()

	// Tracing first: probes enable their outlier events only if spans go
	// somewhere.
	if tracing.Enabled(os.Getenv) {
		p, err := tracing.New(context.Background(), tracing.Options{QueueSize: cfg.SpanQueueSize}, exemplars, log.With("component", "tracing"))
		if err != nil {
			return nil, fmt.Errorf("tracing: %w", err)
		}
		d.tracing = p
		log.Info("exporting spans of kernel outliers over OTLP")
	}

	// client-go logs through klog, in its own text format on stderr unless
	// routed to ktel's logger: for workload attribution and lb's
	// Kubernetes source alike.
	if cfg.Workloads() == config.WorkloadsKubernetes || cfg.LBSource == "kubernetes" {
		klog.SetSlogLogger(log.With("component", "client-go"))
	}
	if err := d.startWorkloads(); err != nil {
		d.Close()
		return nil, err
	}

	if cfg.BPFStats {
		closer, err := ebpf.EnableStats(uint32(bpfStatsRunTime))
		if err != nil {
			log.Warn("cannot enable BPF run-time statistics (needs CAP_SYS_ADMIN); ktel_bpf_program_run_* will be absent", "err", err)
		} else {
			d.stats = closer
		}
	}

	for _, name := range cfg.EnabledProbes() {
		plog := log.With("probe", name)
		e := env{cfg: cfg, log: plog, exemplars: exemplars, spans: d.tracing != nil}
		if d.workloads != nil {
			e.workloads = d.workloads
			// Pods' addresses come from the API server; with cgroup
			// paths alone netdev's series keep their labels.
			if cfg.Workloads() == config.WorkloadsKubernetes {
				e.pods = d.workloads
			}
		}
		p, err := start(starters, name, e)
		if err != nil {
			logLoadError(plog, err)
			self.ProbeUp.WithLabelValues(name).Set(0)
			continue
		}
		d.probes[name] = p
		self.ProbeUp.WithLabelValues(name).Set(1)
		if es, ok := p.(eventSource); ok && d.tracing != nil {
			if r, _ := lookup(name); r.decoder == nil {
				plog.Error("events without a decoder; no spans from this probe")
			} else if err := d.tracing.Add(name, es.Events(), d.decoder(r.decoder)); err != nil {
				plog.Error("cannot read outlier events; no spans from this probe", "err", err)
			}
		}
	}

	collectors := map[string]metrics.Collector{}
	objs := map[string]metrics.BPFObjects{}
	for name, p := range d.probes {
		collectors[name] = p
		objs[name] = p
	}
	collectors["bpf"] = metrics.NewBPFCollector(objs, d.stats != nil)
	if d.tracing != nil {
		collectors["spans"] = metrics.NewSpansCollector(d.tracing.Counts)
	}
	if d.workloads != nil {
		collectors["workload"] = metrics.NewWorkloadCollector(d.workloads)
	}
	if err := reg.Register(metrics.NewExporter(collectors, log)); err != nil {
		d.Close()
		return nil, fmt.Errorf("register exporter: %w", err)
	}
	d.gate = &gatherGate{g: prometheus.ToTransactionalGatherer(reg)}
	return d, nil
}

// decoder is dec, adding the workload's attributes to spans when
// workload attribution is on.
func (d *Daemon) decoder(dec tracing.Decoder) tracing.Decoder {
	if d.workloads == nil {
		return dec
	}
	return tracing.WithWorkloads(dec, d.workloads)
}

// startWorkloads starts workload attribution (KTEL_WORKLOAD_ATTRIBUTION):
// a resolver of cgroup ids that probes key their kernel counters by, to
// this node's pods when KTEL_NODE_NAME names it (and, outside pods,
// systemd units), or to units and containers from cgroup paths alone.
// Off, metrics keep their node-level series. A host without a cgroup v2
// hierarchy has no ids to resolve: attribution is then unavailable,
// logged, and the probes run node-level.
func (d *Daemon) startWorkloads() error {
	source := d.cfg.Workloads()
	if source == config.WorkloadsOff {
		return nil
	}
	log := d.log.With("component", "workload")
	opts := k8smeta.Options{
		TTL:          d.cfg.WorkloadLabelTTL,
		MaxLabelSets: d.cfg.WorkloadMaxLabelSets,
		Logger:       log,
	}
	if source == config.WorkloadsKubernetes {
		opts.NodeName, opts.Kubeconfig = d.cfg.NodeName, os.Getenv("KUBECONFIG")
	}
	r, err := k8smeta.New(opts)
	if errors.Is(err, cgroups.ErrNoV2) {
		log.Warn("workload attribution unavailable: no cgroup v2 hierarchy (a cgroup v1-only host); metrics stay node-level", "err", err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("workload attribution (%s): %w", source, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.workloads, d.stopWorkloads, d.workloadsDone = r, cancel, make(chan struct{})
	go func() {
		defer close(d.workloadsDone)
		if err := r.Run(ctx); err != nil {
			log.Error("workload attribution stopped; cgroups are labelled from what it had", "err", err)
		}
	}()
	log.Info("workload attribution on", "source", source, "node", opts.NodeName)
	return nil
}

// dropCapabilities gives up, on every thread, the capabilities the running
// probes no longer need (KTEL_KEEP_CAPABILITIES).
func (d *Daemon) dropCapabilities() {
	keep, auto, err := d.cfg.KeepCaps()
	if err != nil { // validated in config.Load
		d.log.Error("KTEL_KEEP_CAPABILITIES", "err", err)
		return
	}
	if auto {
		for name := range d.probes {
			r, _ := lookup(name)
			keep |= caps.Of(r.keep...)
		}
		if held, err := caps.Effective(); err == nil {
			keep = keep.WithStandIns(held)
		}
	}
	if err := caps.Drop(keep); err != nil {
		d.log.Warn("cannot drop capabilities", "err", err)
		return
	}
	held, _ := caps.Effective()
	d.log.Info("dropped capabilities", "kept", held.String())
}

// unknownWorkloads names no cgroup (ktel check).
type unknownWorkloads struct{}

func (unknownWorkloads) Resolve(uint64) k8smeta.Labels { return k8smeta.Labels{Unit: k8smeta.Unknown} }

// bpfStatsRunTime is BPF_STATS_RUN_TIME from the kernel UAPI.
const bpfStatsRunTime = 0

// logLoadError logs why a probe did not load, with the verifier's full log
// when the verifier refused a program.
func logLoadError(log *slog.Logger, err error) {
	attrs := probe.ErrAttrs(err)
	if probe.Unsupported(err) {
		log.Warn("probe unsupported on this kernel", attrs...)
	} else {
		log.Error("probe failed to load", attrs...)
	}
}

// verdict is err on one line, led by its root cause when one is known,
// without the "unsupported on this kernel" the verdict already says. The
// log has the full error, one line per alternative tried.
func verdict(err error) string {
	msg := strings.TrimPrefix(err.Error(), probe.ErrUnsupported.Error()+": ")
	msg = strings.Join(strings.Split(msg, "\n"), "; ")
	if cause := probe.Cause(err); cause != "" {
		msg = cause + ": " + msg
	}
	return msg
}

// Running is the number of probes loaded.
func (d *Daemon) Running() int { return len(d.probes) }

// Handler serves /metrics, /healthz and a landing page.
func (d *Daemon) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", metrics.Handler(d.gate, metrics.HandlerOpts{
		Log:      d.log,
		Registry: d.reg,
		// Beyond this many concurrent scrapes, answer 503 at once.
		MaxRequestsInFlight: d.cfg.MaxScrapes,
		Timeout:             scrapeTimeout,
	}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		v, _, _ := version.Info()
		fmt.Fprintf(w, landing, v)
	})
	return mux
}

const landing = `<!doctype html>
<html><head><title>ktel</title></head>
<body><h1>ktel</h1><p>Kernel telemetry from eBPF, version %s.</p>
<ul><li><a href="metrics">metrics</a></li><li><a href="healthz">healthz</a></li></ul>
</body></html>
`

// scrapeTimeout bounds one scrape; the HTTP write timeout leaves room
// beyond it to send the error.
const scrapeTimeout = 20 * time.Second

// Listen opens the configured address. ktel listens before it loads
// anything: an address in use fails at once, and a privileged port is
// bound before the capabilities are dropped.
func Listen(cfg *config.Config) (net.Listener, error) {
	ln, err := net.Listen("tcp", cfg.ListenAddress)
	if err != nil {
		return nil, fmt.Errorf("listen on %s (KTEL_LISTEN_ADDRESS): %w", cfg.ListenAddress, err)
	}
	return ln, nil
}

// shutdownTimeout bounds the wait for requests in progress at shutdown;
// with tracing's 5 s to export, ktel stops within a Kubernetes pod's
// default grace period of 30 s (15 s in ktel's manifests).
const shutdownTimeout = 5 * time.Second

// Serve serves HTTP on ln until ctx is done, then shuts the server down
// gracefully: requests in progress get shutdownTimeout to finish, and are
// cut after. With KTEL_WEB_CONFIG_FILE, TLS and basic authentication apply
// to every path.
func (d *Daemon) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           d.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      scrapeTimeout + 10*time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() {
		errc <- web.Serve(ln, srv, &web.FlagConfig{WebConfigFile: &d.cfg.WebConfigFile}, d.log.With("component", "http"))
	}()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdown); err != nil {
		// A scrape still running is no reason to fail a requested stop;
		// Close waits for gathers that still read the maps.
		d.log.Warn("closing HTTP connections still busy at shutdown", "after", shutdownTimeout, "err", err)
		srv.Close()
	}
	return nil
}

// Reload asks every probe with external configuration (the lb services
// file) to read it again; on SIGHUP. A probe logs and counts its own
// failures and keeps its previous configuration.
func (d *Daemon) Reload() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for name, p := range d.probes {
		if r, ok := p.(interface{ Reload() error }); ok {
			if err := r.Reload(); err != nil {
				d.log.Warn("reload failed; previous configuration kept", "probe", name, "err", err)
			}
		}
	}
}

// Close stops scrapes from reading the maps (waiting for those that are),
// detaches the probes that emit events, stops tracing once it has read
// what the ring buffers hold (exporting what is queued, for up to 5 s),
// then detaches every other probe and releases the maps. It is idempotent.
func (d *Daemon) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gate != nil {
		d.gate.close()
	}
	var errs []error
	if d.tracing != nil {
		// Detached first, so that no event comes after the last read.
		for name, p := range d.probes {
			if dp, ok := p.(detacher); ok {
				if err := dp.Detach(); err != nil {
					errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
				}
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		errs = append(errs, d.tracing.Close(ctx))
		cancel()
		d.tracing = nil
	}
	for name, p := range d.probes {
		if err := p.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", name, err))
		}
	}
	d.probes = nil
	if d.stopWorkloads != nil {
		d.stopWorkloads()
		<-d.workloadsDone
		d.stopWorkloads = nil
	}
	if d.stats != nil {
		errs = append(errs, d.stats.Close())
		d.stats = nil
	}
	return errors.Join(errs...)
}

// Check loads and attaches every enabled probe in turn, writes one verdict
// per probe and detaches it again. It reports whether all loaded.
func Check(cfg *config.Config, log *slog.Logger, w io.Writer) bool {
	return check(cfg, log, w, starters())
}

func check(cfg *config.Config, log *slog.Logger, w io.Writer, starters map[string]starter) bool {
	ok := true
	// With workload attribution the probes load per-cgroup programs (and
	// the syscall probe, with KTEL_SYSCALL_PER_CONTAINER, per-container
	// ones): those are what to check. Nothing is named here, so no API
	// server is asked; without cgroup v2 the daemon runs attribution off.
	var workloads metrics.Workloads
	if _, err := cgroups.V2Root(); err == nil && cfg.Workloads() != config.WorkloadsOff {
		workloads = unknownWorkloads{}
	}
	for _, name := range cfg.EnabledProbes() {
		p, err := start(starters, name, env{cfg: cfg, log: log.With("probe", name), workloads: workloads})
		switch {
		case err == nil:
			fmt.Fprintf(w, "%s: ok\n", name)
			if err := p.Close(); err != nil {
				fmt.Fprintf(w, "%s: failed: close: %v\n", name, err)
				ok = false
			}
			continue
		case probe.Unsupported(err):
			fmt.Fprintf(w, "%s: unsupported on this kernel: %s\n", name, verdict(err))
		default:
			fmt.Fprintf(w, "%s: failed: %s\n", name, verdict(err))
		}
		logLoadError(log.With("probe", name), err)
		ok = false
	}
	return ok
}
