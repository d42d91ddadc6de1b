package config

import (
	"errors"
	"flag"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// testProbes stand for the probes internal/daemon registers: the default
// ones by name, and one that needs input and validates it.
var testProbes = []Probe{
	{Name: "syscall", Default: true}, {Name: "runqlat", Default: true}, {Name: "tcpretrans", Default: true},
	{Name: "netdev",
		Input: func(c *Config) bool { return c.Interfaces != "" },
		Validate: func(c *Config, enabled bool) []error {
			if enabled && c.Interfaces == "" {
				return []error{Invalid("KTEL_INTERFACES", c.Interfaces, "needed")}
			}
			return nil
		}},
}

// setenv sets vars for the test and unsets every other KTEL_* variable, so
// the defaults apply.
func setenv(t *testing.T, vars map[string]string) {
	t.Helper()
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, Prefix+"_") {
			val := os.Getenv(name)
			os.Unsetenv(name)
			t.Cleanup(func() { os.Setenv(name, val) })
		}
	}
	for k, v := range vars {
		t.Setenv(k, v)
	}
}

func TestDefaults(t *testing.T) {
	setenv(t, nil)
	c, err := Load(testProbes)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{ListenAddress: ":9437", MaxScrapes: 10, KeepCapabilities: "auto", Probes: "syscall,runqlat,tcpretrans", LogLevel: "info", LogFormat: "text",
		TCPRetransMaxPeers: 100, NetdevHook: "tc", NetdevTCMode: "auto", NetdevMaxInterfaces: 256,
		LBAlgorithm: "random", LBMaglevTableSize: 1021, LBMaxServices: 16384, LBMaxBackends: 65536, LBMaxSockets: 65536, LBSource: "file",
		HistogramSchema: 3, BPFStats: false, SyscallHook: "auto", SyscallTiming: "sample", SyscallSampleRate: 64, RunqlatHook: "auto", RunqlatPerCPU: false,
		SyscallSpanThreshold: 100 * time.Millisecond, RunqlatSpanThreshold: 50 * time.Millisecond,
		SpanRateLimit: 1000, SpanQueueSize: 4096,
		WorkloadAttribution: "auto", WorkloadLabelTTL: 2 * time.Minute, WorkloadMaxLabelSets: 2000}
	if *c != want {
		t.Errorf("defaults %+v, want %+v", *c, want)
	}
}

func TestWorkloads(t *testing.T) {
	for _, tc := range []struct{ attribution, node, want string }{
		{"auto", "", WorkloadsOff},
		{"auto", "node-a", WorkloadsKubernetes},
		{"cgroup", "", WorkloadsCgroup},
		{"cgroup", "node-a", WorkloadsCgroup},
		{"off", "node-a", WorkloadsOff},
		{"off", "", WorkloadsOff},
	} {
		c := Config{WorkloadAttribution: tc.attribution, NodeName: tc.node}
		if got := c.Workloads(); got != tc.want {
			t.Errorf("KTEL_WORKLOAD_ATTRIBUTION=%s KTEL_NODE_NAME=%s: %q, want %q", tc.attribution, tc.node, got, tc.want)
		}
	}
}

func TestValidation(t *testing.T) {
	for _, tc := range []struct {
		name, value string
		ok          bool
	}{
		{"KTEL_LISTEN_ADDRESS", ":9437", true},
		{"KTEL_LISTEN_ADDRESS", "127.0.0.1:0", true},
		{"KTEL_LISTEN_ADDRESS", "[::1]:9437", true},
		{"KTEL_LISTEN_ADDRESS", "localhost:80", true},
		{"KTEL_LISTEN_ADDRESS", "9437", false},
		{"KTEL_LISTEN_ADDRESS", ":http", false},
		{"KTEL_LISTEN_ADDRESS", ":70000", false},
		{"KTEL_LISTEN_ADDRESS", "", false},
		{"KTEL_WEB_CONFIG_FILE", "", true},
		{"KTEL_WEB_CONFIG_FILE", "/nonexistent/web.yml", false},
		{"KTEL_WEB_CONFIG_FILE", "testdata/web-bad.yml", false},
		{"KTEL_WEB_CONFIG_FILE", "testdata/web-ok.yml", true},
		{"KTEL_KEEP_CAPABILITIES", "all", true},
		{"KTEL_KEEP_CAPABILITIES", "CAP_BPF,net_admin", true},
		{"KTEL_KEEP_CAPABILITIES", "CAP_FLY", false},
		{"KTEL_KEEP_CAPABILITIES", "", false},
		{"KTEL_MAX_CONCURRENT_SCRAPES", "1", true},
		{"KTEL_MAX_CONCURRENT_SCRAPES", "0", false},
		{"KTEL_PROBES", "syscall", true},
		{"KTEL_PROBES", " syscall , syscall", true},
		{"KTEL_PROBES", "", false},
		{"KTEL_PROBES", ",", false},
		{"KTEL_PROBES", "syscall,nosuch", false},
		{"KTEL_LOG_LEVEL", "debug", true},
		{"KTEL_LOG_LEVEL", "warn", true},
		{"KTEL_LOG_LEVEL", "error", true},
		{"KTEL_LOG_LEVEL", "loud", false},
		{"KTEL_LOG_LEVEL", "INFO", false},
		{"KTEL_LOG_FORMAT", "json", true},
		{"KTEL_LOG_FORMAT", "text", true},
		{"KTEL_LOG_FORMAT", "xml", false},
		{"KTEL_HISTOGRAM_SCHEMA", "0", true},
		{"KTEL_HISTOGRAM_SCHEMA", "4", true},
		{"KTEL_HISTOGRAM_SCHEMA", "5", false},
		{"KTEL_HISTOGRAM_SCHEMA", "-1", false},
		{"KTEL_HISTOGRAM_SCHEMA", "three", false},
		{"KTEL_BPF_STATS", "true", true},
		{"KTEL_BPF_STATS", "false", true},
		{"KTEL_BPF_STATS", "1", true},
		{"KTEL_BPF_STATS", "maybe", false},
		{"KTEL_PROBES", "runqlat", true},
		{"KTEL_PROBES", "runqlat,syscall", true},
		{"KTEL_RUNQLAT_PER_CPU", "true", true},
		{"KTEL_RUNQLAT_PER_CPU", "yes", false},
		{"KTEL_SYSCALL_PER_CONTAINER", "false", true},
		{"KTEL_SYSCALL_PER_CONTAINER", "on", false},
		{"KTEL_SYSCALL_SPAN_THRESHOLD", "250ms", true},
		{"KTEL_SYSCALL_SPAN_THRESHOLD", "0", true},
		{"KTEL_SYSCALL_SPAN_THRESHOLD", "100", false},
		{"KTEL_RUNQLAT_SPAN_THRESHOLD", "2ms", true},
		{"KTEL_RUNQLAT_SPAN_THRESHOLD", "soon", false},
		{"KTEL_SPAN_RATE_LIMIT", "0", true},
		{"KTEL_SPAN_RATE_LIMIT", "-5", false},
		{"KTEL_SPAN_RATE_LIMIT", "lots", false},
		{"KTEL_SPAN_QUEUE_SIZE", "1", true},
		{"KTEL_SPAN_QUEUE_SIZE", "0", false},
		{"KTEL_TCPRETRANS_SPANS", "true", true},
		{"KTEL_TCPRETRANS_SPANS", "all", false},
		{"KTEL_TCPRETRANS_PEERS", "true", true},
		{"KTEL_TCPRETRANS_PEERS", "peers", false},
		{"KTEL_NODE_NAME", "node-1.example", true},
		{"KTEL_NODE_NAME", "Node_1", false},
		{"KTEL_NODE_NAME", "-node", false},
		{"KTEL_NODE_NAME", "a..b", false},
		{"KTEL_WORKLOAD_ATTRIBUTION", "auto", true},
		{"KTEL_WORKLOAD_ATTRIBUTION", "cgroup", true},
		{"KTEL_WORKLOAD_ATTRIBUTION", "off", true},
		{"KTEL_WORKLOAD_ATTRIBUTION", "systemd", false},
		{"KTEL_WORKLOAD_ATTRIBUTION", "", false},
		{"KTEL_WORKLOAD_LABEL_TTL", "1s", true},
		{"KTEL_WORKLOAD_LABEL_TTL", "999ms", false},
		{"KTEL_WORKLOAD_LABEL_TTL", "long", false},
		{"KTEL_WORKLOAD_MAX_LABEL_SETS", "1", true},
		{"KTEL_WORKLOAD_MAX_LABEL_SETS", "0", false},
		{"KTEL_WORKLOAD_MAX_LABEL_SETS", "1000001", false},
		{"KTEL_NETDEV_PACKET_SIZES", "true", true},
		{"KTEL_NETDEV_PACKET_SIZES", "big", false},
	} {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			setenv(t, map[string]string{tc.name: tc.value})
			_, err := Load(testProbes)
			if tc.ok {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("got %v, want *config.Error", err)
			}
			f, _ := fieldByVar(tc.name)
			msg := err.Error()
			if ce.Var != tc.name || !strings.Contains(msg, tc.name) || !strings.Contains(msg, f.Values) {
				t.Errorf("message %q does not name %s and its values %q", msg, tc.name, f.Values)
			}
		})
	}
}

// Only KTEL_* names are read: envconfig, given a prefix, would also read
// LOG_LEVEL for KTEL_LOG_LEVEL.
func TestUnprefixedIgnored(t *testing.T) {
	setenv(t, map[string]string{"LOG_LEVEL": "loud", "PROBES": "nosuch", "INTERFACES": "eth0", "MAX_CONCURRENT_SCRAPES": "0"})
	c, err := Load(testProbes)
	if err != nil {
		t.Fatalf("unprefixed variables were read: %v", err)
	}
	if c.LogLevel != "info" || c.MaxScrapes != 10 || c.Interfaces != "" || c.Probes != "syscall,runqlat,tcpretrans" {
		t.Errorf("unprefixed variables changed the configuration: %+v", *c)
	}
}

// ktel ignores the variable that enables its privileged tests.
func TestPrivilegedTestsVar(t *testing.T) {
	if PrivilegedTestsVar != testenv.PrivilegedEnv {
		t.Errorf("config.PrivilegedTestsVar %q, testenv.PrivilegedEnv %q", PrivilegedTestsVar, testenv.PrivilegedEnv)
	}
	if u := Unknown([]string{PrivilegedTestsVar + "=1"}, PrivilegedTestsVar); len(u) != 0 {
		t.Errorf("Unknown reports %v", u)
	}
}

func TestAllErrorsReported(t *testing.T) {
	setenv(t, map[string]string{"KTEL_LOG_LEVEL": "loud", "KTEL_LOG_FORMAT": "xml"})
	_, err := Load(testProbes)
	if err == nil || !strings.Contains(err.Error(), "KTEL_LOG_LEVEL") || !strings.Contains(err.Error(), "KTEL_LOG_FORMAT") {
		t.Fatalf("want both variables named, got %v", err)
	}
}

// Every field is documented (internal/daemon checks that KTEL_PROBES
// agrees with the registered probes).
func TestFieldsDocumented(t *testing.T) {
	for _, f := range Fields() {
		if !strings.HasPrefix(f.Var, Prefix+"_") || f.Var == Prefix+"_" || f.Values == "" || f.Desc == "" {
			t.Errorf("%s lacks envconfig, values or desc tags", f.Var)
		}
	}
}

var update = flag.Bool("update", false, "rewrite README.md's configuration table")

// README.md's reference table is the one generated here.
func TestReadmeMatches(t *testing.T) {
	const path = "../../README.md"
	readme, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	begin := regexp.MustCompile(`(?m)^<!-- BEGIN config.*-->\n`).FindIndex(readme)
	end := regexp.MustCompile(`(?m)^<!-- END config -->`).FindIndex(readme)
	if begin == nil || end == nil || end[0] < begin[1] {
		t.Fatal("README.md lacks the BEGIN config / END config markers")
	}
	if got := string(readme[begin[1]:end[0]]); got != Markdown() {
		if !*update {
			t.Fatalf("README.md configuration table is stale: run go test ./internal/config -run Readme -update")
		}
		out := append(append(slices.Clone(readme[:begin[1]]), Markdown()...), readme[end[0]:]...)
		if err := os.WriteFile(path, out, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestUnknown(t *testing.T) {
	got := Unknown([]string{"KTEL_PROBE=syscall", "KTEL_PROBES=syscall", "PATH=/bin", "KTEL_PRIVILEGED_TESTS=1"}, "KTEL_PRIVILEGED_TESTS")
	if len(got) != 1 || got[0] != "KTEL_PROBE" {
		t.Errorf("Unknown = %v, want [KTEL_PROBE]", got)
	}
}

// A probe's input enables it unless KTEL_PROBES is set, and its Validate
// runs, knowing whether it is enabled, whether it is or not.
func TestProbeHooks(t *testing.T) {
	setenv(t, map[string]string{"KTEL_INTERFACES": "veth*"})
	c, err := Load(testProbes)
	if err != nil {
		t.Fatal(err)
	}
	if c.Probes != "syscall,runqlat,tcpretrans,netdev" {
		t.Errorf("KTEL_PROBES %q, want netdev enabled by its input", c.Probes)
	}
	setenv(t, map[string]string{"KTEL_PROBES": "netdev"})
	_, err = Load(testProbes)
	var ce *Error
	if !errors.As(err, &ce) || ce.Var != "KTEL_INTERFACES" || ce.Accepted == "" {
		t.Errorf("netdev without input: %v, want an error naming KTEL_INTERFACES and its values", err)
	}
	setenv(t, map[string]string{"KTEL_PROBES": "syscall"})
	if _, err := Load(testProbes); err != nil {
		t.Errorf("netdev disabled, without input: %v", err)
	}
}

// The configuration needs none of the probes' code: validating the
// environment must not load BPF objects (nor pull in their packages).
func TestNoProbeImports(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "github.com/ktel-dev/ktel/bpf/") || pkg == "github.com/ktel-dev/ktel/internal/lb" || pkg == "github.com/ktel-dev/ktel/internal/probe" {
			t.Errorf("internal/config depends on %s", pkg)
		}
	}
}
