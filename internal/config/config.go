// Package config is ktel's configuration: the KTEL_* environment variables,
// their defaults and meaning, and their validation, which is one pass over
// the generic variables and the Validate of each probe registered (in
// internal/daemon), so that this package needs none of the probes' code.
// The same struct tags produce `ktel --help` and the README's reference
// table.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kelseyhightower/envconfig"
	"golang.org/x/sys/unix"

	"github.com/prometheus/exporter-toolkit/web"

	"github.com/ktel-dev/ktel/internal/caps"
)

// Prefix of every variable.
const Prefix = "KTEL"

// PrivilegedTestsVar enables ktel's privileged tests (internal/testenv). It
// is not ktel's setting, but it is set where ktel's tests start ktel.
const PrivilegedTestsVar = "KTEL_PRIVILEGED_TESTS"

// Probe is what the configuration knows of a probe; the probes register
// themselves, with these fields, in internal/daemon, so that this package
// needs none of their code. A probe that needs input (a list of
// interfaces, say) is off by default.
type Probe struct {
	Name    string
	Default bool
	Help    string
	// Input, if set, reports whether the input the probe needs is given:
	// the probe then starts unless KTEL_PROBES is set.
	Input func(c *Config) bool
	// Validate, if set, checks the probe's own variables and returns one
	// error (from Invalid) per invalid variable. It runs whether the probe
	// is enabled or not, so that a typo is reported before it matters;
	// enabled says whether the probe is in KTEL_PROBES.
	Validate func(c *Config, enabled bool) []error
}

// Config is the daemon's configuration. Tags: envconfig (the variable's
// full name), default, values (the accepted values, as shown in errors and
// help) and desc.
type Config struct {
	ListenAddress    string `envconfig:"KTEL_LISTEN_ADDRESS" default:":9437" values:"[host]:port" desc:"Address of the HTTP server (/metrics, /healthz)."`
	WebConfigFile    string `envconfig:"KTEL_WEB_CONFIG_FILE" default:"" values:"path to a Prometheus web configuration file, or empty" desc:"TLS and basic authentication for the HTTP server, in the exporter-toolkit format (tls_server_config, basic_auth_users). Empty: plain HTTP."`
	MaxScrapes       int    `envconfig:"KTEL_MAX_CONCURRENT_SCRAPES" default:"10" values:"integer >= 1" desc:"Scrapes served at once; more get HTTP 503 at once rather than queueing."`
	Probes           string `envconfig:"KTEL_PROBES" default:"syscall,runqlat,tcpretrans" values:"comma-separated probe names: syscall,runqlat,tcpretrans,netdev,lb" desc:"Probes to load. The default is every probe that needs no further input, plus netdev when KTEL_INTERFACES is set and lb when KTEL_LB_SERVICES_FILE is or KTEL_LB_SOURCE=kubernetes."`
	LogLevel         string `envconfig:"KTEL_LOG_LEVEL" default:"info" values:"debug|info|warn|error" desc:"Minimum level of log records."`
	LogFormat        string `envconfig:"KTEL_LOG_FORMAT" default:"text" values:"text|json" desc:"Log record format, on standard error."`
	HistogramSchema  int    `envconfig:"KTEL_HISTOGRAM_SCHEMA" default:"3" values:"0..4" desc:"Native-histogram schema of latency histograms: 2^schema buckets per power of two; at 3 a bucket spans 9.05%, so a value is known to within 4.4% of its bucket's middle and an interpolated quantile to within a bucket. Higher costs kernel memory: about 1.1 MiB per CPU at 3, 2.2 at 4."`
	KeepCapabilities string `envconfig:"KTEL_KEEP_CAPABILITIES" default:"auto" values:"auto|all|comma-separated capabilities (CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,...)" desc:"Capabilities kept once the probes are attached; the others are dropped from every thread. auto: what the running probes still need (netdev attaches to new interfaces, lb creates maps on reload)."`
	BPFStats         bool   `envconfig:"KTEL_BPF_STATS" default:"false" values:"true|false" desc:"Enable kernel BPF run-time statistics (kernel.bpf_stats_enabled) and export run time and run count per program. Costs two clock reads per program run, for every BPF program on the host, while ktel runs."`
	SyscallHook      string `envconfig:"KTEL_SYSCALL_HOOK" default:"auto" values:"auto|tp_btf|raw_tp|tracepoint" desc:"How the syscall probe attaches. auto: tp_btf, with the cheapest storage this kernel has (see Kernel requirements in README); raw_tp and tracepoint (which needs tracefs) only when named."`

	SyscallTiming       string `envconfig:"KTEL_SYSCALL_TIMING" default:"sample" values:"sample|all|list|cgroup" desc:"Which syscalls the syscall probe times (ktel_syscall_latency_seconds, and spans of slow syscalls: only timed syscalls can become spans); ktel_syscalls_total and ktel_syscall_errors_total count every syscall whatever the mode. sample: about 1 in KTEL_SYSCALL_SAMPLE_RATE per CPU, at random. all: every syscall, the most precise and the most costly (see Overhead in README). list: the syscalls in KTEL_SYSCALL_LIST. cgroup: those of the processes in KTEL_SYSCALL_CGROUPS."`
	SyscallSampleRate   int    `envconfig:"KTEL_SYSCALL_SAMPLE_RATE" default:"64" values:"1..1073741824" desc:"With KTEL_SYSCALL_TIMING=sample, 1 syscall in this many is timed, per CPU (1 times every one, as all does, at a little more cost)."`
	SyscallList         string `envconfig:"KTEL_SYSCALL_LIST" default:"" values:"comma-separated syscall names (read,write,futex,...)" desc:"With KTEL_SYSCALL_TIMING=list, the syscalls timed."`
	SyscallCgroups      string `envconfig:"KTEL_SYSCALL_CGROUPS" default:"" values:"comma-separated cgroup v2 directories (at most 1024)" desc:"With KTEL_SYSCALL_TIMING=cgroup, the cgroups whose processes' syscalls are timed: processes directly in one of these, not in their descendants (name a container's own cgroup, not its pod's). Read at start."`
	SyscallPerContainer bool   `envconfig:"KTEL_SYSCALL_PER_CONTAINER" default:"false" values:"true|false" desc:"Break ktel_syscall_latency_seconds down by workload too (labels namespace, pod, container; unit outside pods), with workload attribution (KTEL_WORKLOAD_ATTRIBUTION: on with KTEL_NODE_NAME, or cgroup): the timed syscalls are kept in the kernel per cgroup and syscall, at most 2048 pairs (8 MiB of kernel memory at schema 3, whatever the CPU count); beyond, unit=\"other\", counted. Series: up to KTEL_WORKLOAD_MAX_LABEL_SETS x the syscalls timed; bound them with KTEL_SYSCALL_TIMING=list. ktel_syscalls_total and ktel_syscall_errors_total stay by syscall."`

	RunqlatHook   string `envconfig:"KTEL_RUNQLAT_HOOK" default:"auto" values:"auto|tp_btf|raw_tp|tracepoint" desc:"How the runqlat probe attaches. auto: tp_btf, with the cheapest storage this kernel has (see Kernel requirements in README); raw_tp and tracepoint (which needs tracefs) only when named."`
	RunqlatPerCPU bool   `envconfig:"KTEL_RUNQLAT_PER_CPU" default:"false" values:"true|false" desc:"Break ktel_runqueue_latency_seconds down by CPU (label cpu). Multiplies its series by the number of CPUs. Ignored with workload attribution (KTEL_WORKLOAD_ATTRIBUTION)."`

	TCPRetransPeers    bool `envconfig:"KTEL_TCPRETRANS_PEERS" default:"false" values:"true|false" desc:"Break ktel_tcp_retransmits_total down by remote address:port (label peer), capped by KTEL_TCPRETRANS_MAX_PEERS. With workload attribution (KTEL_WORKLOAD_ATTRIBUTION), by peer instead of by workload."`
	TCPRetransMaxPeers int  `envconfig:"KTEL_TCPRETRANS_MAX_PEERS" default:"100" values:"1..4096" desc:"Distinct peer label values; retransmits to further peers are counted as peer=\"other\" and in ktel_label_overflow_total."`

	Interfaces          string `envconfig:"KTEL_INTERFACES" default:"" values:"comma-separated names or globs (eth0,veth*,lxc*)" desc:"Interfaces the netdev probe counts; ones that appear later are attached, removed ones forgotten. Empty: netdev is not started."`
	NetdevHook          string `envconfig:"KTEL_NETDEV_HOOK" default:"tc" values:"tc|xdp" desc:"Where netdev counts ingress (egress is always TC)."`
	NetdevTCMode        string `envconfig:"KTEL_NETDEV_TC_MODE" default:"auto" values:"auto|tcx|clsact" desc:"auto: tcx links (6.6+), else a clsact qdisc with a direct-action cls_bpf filter."`
	NetdevMaxInterfaces int    `envconfig:"KTEL_NETDEV_MAX_INTERFACES" default:"256" values:"1..65536" desc:"Interface slots (and so the most interface label values); further matching interfaces are not attached, and are logged and counted."`
	NetdevPacketSizes   bool   `envconfig:"KTEL_NETDEV_PACKET_SIZES" default:"false" values:"true|false" desc:"Export ktel_net_packet_size_bytes (a few ns more per packet)."`
	NetdevNetNS         string `envconfig:"KTEL_NETDEV_NETNS" default:"" values:"path to a network namespace file, or empty" desc:"Network namespace whose interfaces netdev watches; empty: ktel's own."`

	LBServicesFile    string `envconfig:"KTEL_LB_SERVICES_FILE" default:"" values:"path to a YAML or JSON services file, or empty" desc:"Services the lb probe balances; reloaded when it changes and on SIGHUP. Empty: lb is not started, unless KTEL_LB_SOURCE=kubernetes."`
	LBCgroup          string `envconfig:"KTEL_LB_CGROUP" default:"" values:"cgroup v2 directory, or empty" desc:"Cgroup whose processes are load balanced. Empty: the root of the cgroup v2 hierarchy (from /proc/self/mountinfo)."`
	LBAlgorithm       string `envconfig:"KTEL_LB_ALGORITHM" default:"random" values:"random|maglev" desc:"How backends are chosen. maglev keeps a UDP socket on its backend when other backends change."`
	LBMaglevTableSize int    `envconfig:"KTEL_LB_MAGLEV_TABLE_SIZE" default:"1021" values:"251|509|1021|2039|4093|8191|16381|32749|65521" desc:"Entries per Maglev table (at least 100 per backend is good); 4 bytes each, per service."`
	LBMaxServices     int    `envconfig:"KTEL_LB_MAX_SERVICES" default:"16384" values:"1..16777216" desc:"Services a file may hold; a file with more is rejected (from Kubernetes, a sync with more fails and is retried), and the previous services keep serving. The services map holds twice as many, so that any file can replace any other."`
	LBMaxBackends     int    `envconfig:"KTEL_LB_MAX_BACKENDS" default:"65536" values:"1..16777216" desc:"Backends over all services (the slot maps hold twice as many, so that any file can replace any other), and per-backend counters."`
	LBMaxSockets      int    `envconfig:"KTEL_LB_MAX_SOCKETS" default:"65536" values:"1..16777216" desc:"Sockets whose peer is shown as the VIP (an LRU map); also the (client, service) pairs remembered for session affinity (another LRU map)."`

	// The Kubernetes source of the lb probe (internal/kubelb).
	LBSource string `envconfig:"KTEL_LB_SOURCE" default:"file" values:"file|kubernetes" desc:"Where the lb probe's services come from: KTEL_LB_SERVICES_FILE, or the Services and EndpointSlices of the Kubernetes API server (see the lb probe in README), through the kubeconfig file in KUBECONFIG or else the Pod's service account. Setting kubernetes starts lb unless KTEL_PROBES says otherwise; with lb on, a KUBECONFIG that names no readable kubeconfig, or none outside a Pod, is a configuration error."`

	// Workload attribution (internal/k8smeta).
	WorkloadAttribution  string        `envconfig:"KTEL_WORKLOAD_ATTRIBUTION" default:"auto" values:"auto|cgroup|off" desc:"Workload attribution: ktel_runqueue_latency_seconds and ktel_tcp_retransmits_total by the workload of the task or socket (and ktel_syscall_latency_seconds with KTEL_SYSCALL_PER_CONTAINER), spans with its k8s.* attributes, and, from the API server only, netdev's series of pods' veths with namespace and pod (see Workload attribution in README). auto: on with KTEL_NODE_NAME (Kubernetes: namespace, pod, container from this node's pods; unit outside pods), off without. cgroup: on, from cgroup paths alone, with no API server even where KTEL_NODE_NAME is set: unit (a systemd unit such as redis-server.service) or container (a container id's first 12 digits, for Docker, Podman, containerd, CRI-O and pods' containers). Costs a kernel map of per-cgroup histograms (allocated as cgroups first wait; about 2.2 KiB each at schema 3, at most 2048) and a series per unit or container with tasks. off: node-level series, even with KTEL_NODE_NAME."`
	NodeName             string        `envconfig:"KTEL_NODE_NAME" default:"" values:"a Kubernetes node name, or empty" desc:"This node's name (the downward API's spec.nodeName, as the manifests set it). Set, with KTEL_WORKLOAD_ATTRIBUTION=auto: workload attribution by pod: ktel watches this node's pods, through the kubeconfig in KUBECONFIG or else the pod's service account, and ktel_runqueue_latency_seconds and ktel_tcp_retransmits_total are by workload (namespace, pod, container; unit outside pods), netdev's series of pods' veths carry namespace and pod, spans carry k8s.* attributes. Empty: attribution follows KTEL_WORKLOAD_ATTRIBUTION (auto: off; series stay node-level). With KTEL_LB_SOURCE=kubernetes, endpoints on this node are local (internalTrafficPolicy Local); empty there means the host name, as kube-proxy assumes."`
	WorkloadLabelTTL     time.Duration `envconfig:"KTEL_WORKLOAD_LABEL_TTL" default:"2m" values:"duration >= 1s" desc:"How long a deleted pod, a removed cgroup and an unused label set stay resolvable; a workload's labels go this long after it does."`
	WorkloadMaxLabelSets int           `envconfig:"KTEL_WORKLOAD_MAX_LABEL_SETS" default:"2000" values:"1..1000000" desc:"Distinct workload label sets (namespace/pod/container, or unit) at once; further workloads are labelled \"other\" and counted."`

	SyscallSpanThreshold time.Duration `envconfig:"KTEL_SYSCALL_SPAN_THRESHOLD" default:"100ms" values:"duration >= 0 (0 disables)" desc:"With tracing on (an OTLP endpoint in OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; see Tracing in README), syscalls at least this slow become spans."`
	TCPRetransSpans      bool          `envconfig:"KTEL_TCPRETRANS_SPANS" default:"false" values:"true|false" desc:"With tracing on, every TCP retransmit becomes a span (with both ends of the connection), within KTEL_SPAN_RATE_LIMIT."`
	RunqlatSpanThreshold time.Duration `envconfig:"KTEL_RUNQLAT_SPAN_THRESHOLD" default:"50ms" values:"duration >= 0 (0 disables)" desc:"With tracing on, run-queue waits at least this long become spans."`
	SpanRateLimit        int           `envconfig:"KTEL_SPAN_RATE_LIMIT" default:"1000" values:"integer >= 0 (0: no limit)" desc:"Most spans per second and probe, enforced in the kernel by per-CPU token buckets: each CPU online at start gets an even share and may save up a second of it (at least one span). The excess is counted in ktel_spans_dropped_total{reason=\"rate_limited\"}."`
	SpanQueueSize        int           `envconfig:"KTEL_SPAN_QUEUE_SIZE" default:"4096" values:"integer >= 1" desc:"Spans waiting for export; when the OTLP endpoint is slow or down, more are dropped and counted (reason queue_full)."`
}

// Error is an invalid variable. Its message names the variable, the value
// and the accepted values.
type Error struct {
	Var, Value, Accepted, Reason string
}

func (e *Error) Error() string {
	msg := fmt.Sprintf("invalid %s=%q", e.Var, e.Value)
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	return msg + "; accepted values: " + e.Accepted
}

// Invalid is the error for variable name (KTEL_...) with value, naming the
// values the variable accepts; reason may be empty.
func Invalid(name, value, reason string) *Error {
	f, _ := fieldByVar(name)
	return &Error{Var: name, Value: value, Accepted: f.Values, Reason: reason}
}

// Load reads the KTEL_* variables from the environment and validates every
// value, those of probes with their own Validate. A value that does not
// parse is reported alone; otherwise all invalid variables are reported,
// joined. Every error is an *Error.
func Load(probes []Probe) (*Config, error) {
	var c Config
	// Full names and no prefix: with a prefix, envconfig also reads the
	// unprefixed name (LOG_LEVEL for KTEL_LOG_LEVEL) when the prefixed one
	// is unset, so a container's unrelated PROBES or INTERFACES would
	// configure ktel.
	if err := envconfig.Process("", &c); err != nil {
		return nil, parseError(err)
	}
	// Probes that need input start when it is given, unless KTEL_PROBES
	// says exactly which probes to run.
	if _, set := os.LookupEnv(Prefix + "_PROBES"); !set {
		for _, p := range probes {
			if !p.Default && p.Input != nil && p.Input(&c) {
				c.Probes += "," + p.Name
			}
		}
	}
	if err := c.Validate(probes); err != nil {
		return nil, err
	}
	return &c, nil
}

// parseError converts envconfig's parse errors to *Error.
func parseError(err error) error {
	var pe *envconfig.ParseError
	if errors.As(err, &pe) {
		f, _ := fieldByVar(pe.KeyName)
		return &Error{Var: pe.KeyName, Value: pe.Value, Accepted: f.Values, Reason: "not a " + pe.TypeName}
	}
	return err
}

// Unknown returns the KTEL_* names in environ (os.Environ()) that ktel
// does not read: most likely typos. Names used only by ktel's tests are
// listed in ignore.
func Unknown(environ []string, ignore ...string) []string {
	var out []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, Prefix+"_") || slices.Contains(ignore, name) {
			continue
		}
		if _, ok := fieldByVar(name); !ok {
			out = append(out, name)
		}
	}
	return out
}

// EnabledProbes returns the probe names in KTEL_PROBES.
func (c *Config) EnabledProbes() []string {
	var out []string
	for _, p := range strings.Split(c.Probes, ",") {
		if p = strings.TrimSpace(p); p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// KeepCaps parses KeepCapabilities: auto (what the probes need, decided by
// the daemon), all (keep everything), or an explicit list.
func (c *Config) KeepCaps() (set caps.Set, auto bool, err error) {
	switch v := strings.TrimSpace(c.KeepCapabilities); v {
	case "auto":
		return 0, true, nil
	case "all":
		return ^caps.Set(0), false, nil
	case "":
		return 0, false, errors.New("empty: name auto, all or the capabilities to keep")
	default:
		for _, name := range strings.Split(v, ",") {
			cp, err := caps.Parse(name)
			if err != nil {
				return 0, false, err
			}
			set |= caps.Of(cp)
		}
		return set, false, nil
	}
}

// Workload attribution sources (Config.Workloads).
const (
	WorkloadsOff        = ""           // node-level series
	WorkloadsKubernetes = "kubernetes" // this node's pods, and cgroup paths
	WorkloadsCgroup     = "cgroup"     // cgroup paths alone
)

// Workloads is where workload attribution names cgroups from, by
// KTEL_WORKLOAD_ATTRIBUTION and KTEL_NODE_NAME.
func (c *Config) Workloads() string {
	switch {
	case c.WorkloadAttribution == "cgroup":
		return WorkloadsCgroup
	case c.WorkloadAttribution == "auto" && c.NodeName != "":
		return WorkloadsKubernetes
	}
	return WorkloadsOff
}

// SlogLevel is LogLevel as a slog.Level.
func (c *Config) SlogLevel() slog.Level {
	var l slog.Level
	_ = l.UnmarshalText([]byte(c.LogLevel))
	return l
}

// Validate checks every value, those of probes with their Validate, and
// returns all problems, joined.
func (c *Config) Validate(probes []Probe) error {
	var errs []error
	bad := func(name, value, reason string) {
		errs = append(errs, Invalid(Prefix+"_"+name, value, reason))
	}

	if host, port, err := net.SplitHostPort(c.ListenAddress); err != nil {
		bad("LISTEN_ADDRESS", c.ListenAddress, "not host:port")
	} else if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
		bad("LISTEN_ADDRESS", c.ListenAddress, "port is not a number 0..65535")
	} else if host != "" && net.ParseIP(strings.Trim(host, "[]")) == nil && strings.ContainsAny(host, " /") {
		bad("LISTEN_ADDRESS", c.ListenAddress, "invalid host")
	}

	if c.WebConfigFile != "" {
		if err := web.Validate(c.WebConfigFile); err != nil {
			bad("WEB_CONFIG_FILE", c.WebConfigFile, err.Error())
		}
	}
	if _, _, err := c.KeepCaps(); err != nil {
		bad("KEEP_CAPABILITIES", c.KeepCapabilities, err.Error())
	}
	if c.MaxScrapes < 1 {
		bad("MAX_CONCURRENT_SCRAPES", strconv.Itoa(c.MaxScrapes), "below 1")
	}

	enabled := c.EnabledProbes()
	if c.NodeName != "" && !isDNSSubdomain(c.NodeName) {
		bad("NODE_NAME", c.NodeName, "not a node name (lower-case letters, digits, '-' and '.', at most 253)")
	}
	if !OneOf(c.WorkloadAttribution, "auto", "cgroup", "off") {
		bad("WORKLOAD_ATTRIBUTION", c.WorkloadAttribution, "")
	}
	if c.WorkloadLabelTTL < time.Second {
		bad("WORKLOAD_LABEL_TTL", c.WorkloadLabelTTL.String(), "below 1s")
	}
	if c.WorkloadMaxLabelSets < 1 || c.WorkloadMaxLabelSets > 1_000_000 {
		bad("WORKLOAD_MAX_LABEL_SETS", strconv.Itoa(c.WorkloadMaxLabelSets), "out of range")
	}

	if len(enabled) == 0 {
		bad("PROBES", c.Probes, "no probe named")
	}
	for _, p := range enabled {
		if !slices.ContainsFunc(probes, func(q Probe) bool { return q.Name == p }) {
			bad("PROBES", c.Probes, fmt.Sprintf("unknown probe %q", p))
		}
	}
	for _, p := range probes {
		if p.Validate != nil {
			errs = append(errs, p.Validate(c, slices.Contains(enabled, p.Name))...)
		}
	}

	if !OneOf(c.LogLevel, "debug", "info", "warn", "error") {
		bad("LOG_LEVEL", c.LogLevel, "")
	}
	if !OneOf(c.LogFormat, "text", "json") {
		bad("LOG_FORMAT", c.LogFormat, "")
	}
	if c.HistogramSchema < 0 || c.HistogramSchema > 4 {
		bad("HISTOGRAM_SCHEMA", strconv.Itoa(c.HistogramSchema), "out of range")
	}
	if c.SpanRateLimit < 0 {
		bad("SPAN_RATE_LIMIT", strconv.Itoa(c.SpanRateLimit), "negative")
	}
	if c.SpanQueueSize < 1 {
		bad("SPAN_QUEUE_SIZE", strconv.Itoa(c.SpanQueueSize), "below 1")
	}
	return errors.Join(errs...)
}

// isDNSSubdomain is Kubernetes' rule for node names (RFC 1123 subdomain).
func isDNSSubdomain(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// OneOf reports whether v is one of accepted.
func OneOf(v string, accepted ...string) bool { return slices.Contains(accepted, v) }

// IsFS reports whether path is on a filesystem of the given magic number
// (unix.CGROUP2_SUPER_MAGIC, say).
func IsFS(path string, magic int64) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && int64(st.Type) == magic
}
