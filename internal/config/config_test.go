package config

import (
	"errors"
	"flag"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

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
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	want := Config{ListenAddress: ":9437", MaxScrapes: 10, KeepCapabilities: "auto", Probes: "syscall,runqlat,tcpretrans", LogLevel: "info", LogFormat: "text",
		TCPRetransMaxPeers: 100, NetdevHook: "tc", NetdevTCMode: "auto", NetdevMaxInterfaces: 256,
		LBAlgorithm: "random", LBMaglevTableSize: 1021, LBMaxServices: 16384, LBMaxBackends: 65536, LBMaxSockets: 65536,
		HistogramSchema: 3, BPFStats: false, SyscallHook: "auto", RunqlatHook: "auto", RunqlatPerCPU: false,
		SyscallSpanThreshold: 100 * time.Millisecond, RunqlatSpanThreshold: 50 * time.Millisecond,
		SpanRateLimit: 1000, SpanQueueSize: 4096}
	if *c != want {
		t.Errorf("defaults %+v, want %+v", *c, want)
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
		{"KTEL_SYSCALL_HOOK", "tp_btf", true},
		{"KTEL_SYSCALL_HOOK", "raw_tp", true},
		{"KTEL_SYSCALL_HOOK", "tracepoint", true},
		{"KTEL_SYSCALL_HOOK", "kprobe", false},
		{"KTEL_PROBES", "runqlat", true},
		{"KTEL_PROBES", "runqlat,syscall", true},
		{"KTEL_RUNQLAT_HOOK", "auto", true},
		{"KTEL_RUNQLAT_HOOK", "raw_tp", true},
		{"KTEL_RUNQLAT_HOOK", "fentry", false},
		{"KTEL_RUNQLAT_PER_CPU", "true", true},
		{"KTEL_RUNQLAT_PER_CPU", "yes", false},
		{"KTEL_SYSCALL_SPAN_THRESHOLD", "250ms", true},
		{"KTEL_SYSCALL_SPAN_THRESHOLD", "0", true},
		{"KTEL_SYSCALL_SPAN_THRESHOLD", "-1s", false},
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
		{"KTEL_TCPRETRANS_MAX_PEERS", "1", true},
		{"KTEL_TCPRETRANS_MAX_PEERS", "0", false},
		{"KTEL_TCPRETRANS_MAX_PEERS", "4096", true},
		{"KTEL_TCPRETRANS_MAX_PEERS", "4097", false},
		{"KTEL_TCPRETRANS_MAX_PEERS", "-1", false},
		{"KTEL_INTERFACES", "eth0,veth*", true},
		{"KTEL_INTERFACES", "eth[", false},
		{"KTEL_NETDEV_HOOK", "xdp", true},
		{"KTEL_NETDEV_HOOK", "kprobe", false},
		{"KTEL_NETDEV_TC_MODE", "clsact", true},
		{"KTEL_NETDEV_TC_MODE", "tc", false},
		{"KTEL_NETDEV_MAX_INTERFACES", "65536", true},
		{"KTEL_NETDEV_MAX_INTERFACES", "0", false},
		{"KTEL_NETDEV_PACKET_SIZES", "true", true},
		{"KTEL_NETDEV_PACKET_SIZES", "big", false},
		{"KTEL_LB_SERVICES_FILE", "testdata/services-ok.yaml", true},
		{"KTEL_LB_SERVICES_FILE", "testdata/services-bad.yaml", false},
		{"KTEL_LB_SERVICES_FILE", "/nonexistent.yaml", false},
		{"KTEL_LB_CGROUP", "/tmp", false},
		{"KTEL_LB_CGROUP", "/nonexistent", false},
		{"KTEL_NETDEV_NETNS", "/tmp", false},
		{"KTEL_NETDEV_NETNS", "/proc/self/ns/net", true},
		{"KTEL_LB_ALGORITHM", "maglev", true},
		{"KTEL_LB_ALGORITHM", "roundrobin", false},
		{"KTEL_LB_MAGLEV_TABLE_SIZE", "251", true},
		{"KTEL_LB_MAGLEV_TABLE_SIZE", "1000", false},
		{"KTEL_LB_MAX_SERVICES", "1", true},
		{"KTEL_LB_MAX_SERVICES", "0", false},
		{"KTEL_LB_MAX_BACKENDS", "16777217", false},
		{"KTEL_LB_MAX_SOCKETS", "many", false},
	} {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			setenv(t, map[string]string{tc.name: tc.value})
			_, err := Load()
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

// Probes that need input start when it is given, unless KTEL_PROBES names
// the probes exactly.
func TestInputEnablesProbes(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"KTEL_INTERFACES": "veth*"}, "syscall,runqlat,tcpretrans,netdev"},
		{map[string]string{"KTEL_LB_SERVICES_FILE": "testdata/services-ok.yaml"}, "syscall,runqlat,tcpretrans,lb"},
		{map[string]string{"KTEL_INTERFACES": "veth*", "KTEL_PROBES": "syscall"}, "syscall"},
		{map[string]string{"KTEL_INTERFACES": "veth*", "KTEL_PROBES": "netdev"}, "netdev"},
		{map[string]string{"KTEL_INTERFACES": " , "}, "syscall,runqlat,tcpretrans"},
		// A services file is not read when lb does not run.
		{map[string]string{"KTEL_LB_SERVICES_FILE": "/nonexistent.yaml", "KTEL_PROBES": "syscall"}, "syscall"},
	} {
		setenv(t, tc.env)
		c, err := Load()
		if err != nil {
			t.Fatalf("%v: %v", tc.env, err)
		}
		if got := strings.Join(c.EnabledProbes(), ","); got != tc.want {
			t.Errorf("%v: probes %q, want %q", tc.env, got, tc.want)
		}
	}
}

// Enabling a probe without its input names the missing variable.
func TestProbeWithoutInput(t *testing.T) {
	for _, tc := range []struct{ probe, missing, value string }{
		{"netdev", "KTEL_INTERFACES", ""},
		{"netdev", "KTEL_INTERFACES", " , "},
		{"lb", "KTEL_LB_SERVICES_FILE", ""},
	} {
		probe, missing := tc.probe, tc.missing
		setenv(t, map[string]string{"KTEL_PROBES": probe, missing: tc.value})
		_, err := Load()
		var ce *Error
		if !errors.As(err, &ce) || ce.Var != missing {
			t.Errorf("KTEL_PROBES=%s: %v, want an error naming %s", probe, err, missing)
		}
	}
}

// A services file that does not fit the maps is refused before loading.
func TestServicesOverCapacity(t *testing.T) {
	setenv(t, map[string]string{"KTEL_LB_SERVICES_FILE": "testdata/services-ok.yaml", "KTEL_LB_MAX_SERVICES": "1"})
	if _, err := Load(); err != nil {
		t.Fatalf("one service with a capacity of one: %v", err)
	}
	setenv(t, map[string]string{"KTEL_LB_SERVICES_FILE": "testdata/services-two.yaml", "KTEL_LB_MAX_SERVICES": "1"})
	_, err := Load()
	var ce *Error
	if !errors.As(err, &ce) || ce.Var != "KTEL_LB_SERVICES_FILE" || !strings.Contains(err.Error(), "KTEL_LB_MAX_SERVICES=1") {
		t.Errorf("two services with a capacity of one: %v", err)
	}
}

// Only KTEL_* names are read: envconfig, given a prefix, would also read
// LOG_LEVEL for KTEL_LOG_LEVEL.
func TestUnprefixedIgnored(t *testing.T) {
	setenv(t, map[string]string{"LOG_LEVEL": "loud", "PROBES": "nosuch", "INTERFACES": "eth0", "MAX_CONCURRENT_SCRAPES": "0"})
	c, err := Load()
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
	_, err := Load()
	if err == nil || !strings.Contains(err.Error(), "KTEL_LOG_LEVEL") || !strings.Contains(err.Error(), "KTEL_LOG_FORMAT") {
		t.Fatalf("want both variables named, got %v", err)
	}
}

// Every field is documented, and the documented defaults and probe names
// agree with the probe list.
func TestFieldsDocumented(t *testing.T) {
	for _, f := range Fields() {
		if !strings.HasPrefix(f.Var, Prefix+"_") || f.Var == Prefix+"_" || f.Values == "" || f.Desc == "" {
			t.Errorf("%s lacks envconfig, values or desc tags", f.Var)
		}
	}
	var defaults, all []string
	for _, p := range Probes {
		all = append(all, p.Name)
		if p.Default {
			defaults = append(defaults, p.Name)
		}
	}
	f, _ := fieldByVar("KTEL_PROBES")
	if f.Default != strings.Join(defaults, ",") {
		t.Errorf("KTEL_PROBES default %q, want the default probes %q", f.Default, strings.Join(defaults, ","))
	}
	if !strings.HasSuffix(f.Values, strings.Join(all, ",")) {
		t.Errorf("KTEL_PROBES values %q do not list %q", f.Values, strings.Join(all, ","))
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
