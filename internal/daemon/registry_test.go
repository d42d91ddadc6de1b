package daemon

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/probe"
)

// setenv sets vars for the test and unsets every other KTEL_* variable, so
// the defaults apply.
func setenv(t *testing.T, vars map[string]string) {
	t.Helper()
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, config.Prefix+"_") {
			val := os.Getenv(name)
			os.Unsetenv(name)
			t.Cleanup(func() { os.Setenv(name, val) })
		}
	}
	for k, v := range vars {
		t.Setenv(k, v)
	}
}

func field(name string) config.Field {
	for _, f := range config.Fields() {
		if f.Var == name {
			return f
		}
	}
	return config.Field{Var: name}
}

// Each probe's variables are validated by its registration, with errors
// naming the variable and its accepted values.
func TestProbeValidation(t *testing.T) {
	for _, tc := range []struct {
		name, value string
		ok          bool
	}{
		{"KTEL_SYSCALL_HOOK", "tp_btf", true},
		{"KTEL_SYSCALL_HOOK", "raw_tp", true},
		{"KTEL_SYSCALL_HOOK", "tracepoint", true},
		{"KTEL_SYSCALL_HOOK", "kprobe", false},
		{"KTEL_RUNQLAT_HOOK", "auto", true},
		{"KTEL_RUNQLAT_HOOK", "raw_tp", true},
		{"KTEL_RUNQLAT_HOOK", "fentry", false},
		{"KTEL_SYSCALL_SPAN_THRESHOLD", "-1s", false},
		{"KTEL_SYSCALL_TIMING", "all", true},
		{"KTEL_SYSCALL_TIMING", "sample", true},
		{"KTEL_SYSCALL_TIMING", "some", false},
		{"KTEL_SYSCALL_SAMPLE_RATE", "1", true},
		{"KTEL_SYSCALL_SAMPLE_RATE", "1073741824", true},
		{"KTEL_SYSCALL_SAMPLE_RATE", "1073741825", false},
		{"KTEL_SYSCALL_SAMPLE_RATE", "0", false},
		{"KTEL_SYSCALL_SAMPLE_RATE", "often", false},
		{"KTEL_SYSCALL_LIST", "read, write,futex", true},
		{"KTEL_SYSCALL_LIST", "read,nosuch", false},
		{"KTEL_SYSCALL_CGROUPS", "/tmp", false},
		{"KTEL_SYSCALL_CGROUPS", "/nonexistent", false},
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
			_, err := config.Load(Probes())
			if tc.ok {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			var ce *config.Error
			if !errors.As(err, &ce) {
				t.Fatalf("got %v, want *config.Error", err)
			}
			f := field(tc.name)
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
		// Asking for the Kubernetes source is asking for lb.
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KUBECONFIG": "testdata/kubeconfig"}, "syscall,runqlat,tcpretrans,lb"},
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KTEL_PROBES": "syscall"}, "syscall"},
	} {
		setenv(t, tc.env)
		c, err := config.Load(Probes())
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
		_, err := config.Load(Probes())
		var ce *config.Error
		if !errors.As(err, &ce) || ce.Var != missing {
			t.Errorf("KTEL_PROBES=%s: %v, want an error naming %s", probe, err, missing)
		}
	}
}

// The Kubernetes source without a client configuration is refused before
// loading, naming KTEL_LB_SOURCE and KUBECONFIG; an API server that does
// not answer is not checked (testdata/kubeconfig names a closed port).
func TestLBKubernetesWithoutKubeconfig(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want string // in the message; "" for no error
	}{
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KUBECONFIG": "testdata/kubeconfig"}, ""},
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KUBECONFIG": "/nonexistent:/nonexistent-too"}, `KUBECONFIG="/nonexistent:/nonexistent-too": none of its files exists`},
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KUBECONFIG": "testdata/services-ok.yaml"}, `KUBECONFIG="testdata/services-ok.yaml": `},
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""}, "KUBECONFIG is not set and the in-cluster configuration"},
		// Not checked when lb does not run.
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KUBECONFIG": "/nonexistent", "KTEL_PROBES": "syscall"}, ""},
	} {
		setenv(t, tc.env)
		_, err := config.Load(Probes())
		if tc.want == "" {
			if err != nil {
				t.Errorf("%v: %v", tc.env, err)
			}
			continue
		}
		var ce *config.Error
		if !errors.As(err, &ce) || ce.Var != "KTEL_LB_SOURCE" || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error naming KTEL_LB_SOURCE and containing %q", tc.env, err, tc.want)
		}
	}
}

// A services file that does not fit the maps is refused before loading.
func TestServicesOverCapacity(t *testing.T) {
	setenv(t, map[string]string{"KTEL_LB_SERVICES_FILE": "testdata/services-ok.yaml", "KTEL_LB_MAX_SERVICES": "1"})
	if _, err := config.Load(Probes()); err != nil {
		t.Fatalf("one service with a capacity of one: %v", err)
	}
	setenv(t, map[string]string{"KTEL_LB_SERVICES_FILE": "testdata/services-two.yaml", "KTEL_LB_MAX_SERVICES": "1"})
	_, err := config.Load(Probes())
	var ce *config.Error
	if !errors.As(err, &ce) || ce.Var != "KTEL_LB_SERVICES_FILE" || !strings.Contains(err.Error(), "KTEL_LB_MAX_SERVICES=1") {
		t.Errorf("two services with a capacity of one: %v", err)
	}
}

// The documented defaults and probe names of KTEL_PROBES agree with the
// registry, and every probe registered can start.
func TestRegistry(t *testing.T) {
	var defaults, all []string
	for _, p := range Probes() {
		all = append(all, p.Name)
		if p.Default {
			defaults = append(defaults, p.Name)
		}
		r, ok := lookup(p.Name)
		if !ok || r.start == nil || len(r.load) == 0 || p.Help == "" {
			t.Errorf("probe %s: registration %+v lacks start, capabilities or help", p.Name, r)
		}
	}
	f := field("KTEL_PROBES")
	if f.Default != strings.Join(defaults, ",") {
		t.Errorf("KTEL_PROBES default %q, want the default probes %q", f.Default, strings.Join(defaults, ","))
	}
	if !strings.HasSuffix(f.Values, strings.Join(all, ",")) {
		t.Errorf("KTEL_PROBES values %q do not list %q", f.Values, strings.Join(all, ","))
	}
	if _, ok := lookup("nosuch"); ok {
		t.Error("lookup found an unregistered probe")
	}
}

// Outlier events are enabled only when spans are exported and the
// threshold is positive, with the configured rate limit.
func TestSpanOptions(t *testing.T) {
	cfg := &config.Config{SpanRateLimit: 250}
	for _, tc := range []struct {
		name      string
		spans     bool
		threshold time.Duration
		want      probe.SpanOptions
	}{
		{"spans on", true, 10 * time.Millisecond, probe.SpanOptions{Threshold: 10 * time.Millisecond, Rate: 250}},
		{"spans off", false, 10 * time.Millisecond, probe.SpanOptions{}},
		{"threshold zero", true, 0, probe.SpanOptions{}},
		{"threshold negative", true, -time.Second, probe.SpanOptions{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := (env{cfg: cfg, spans: tc.spans}).spanOptions(tc.threshold); got != tc.want {
				t.Errorf("spanOptions(%v) = %+v, want %+v", tc.threshold, got, tc.want)
			}
		})
	}
}

func TestLBSource(t *testing.T) {
	for _, tc := range []struct {
		env     map[string]string
		wantVar string // "" when valid
	}{
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KTEL_NODE_NAME": "n1", "KUBECONFIG": "testdata/kubeconfig"}, ""},
		{map[string]string{"KTEL_LB_SOURCE": "etcd"}, "KTEL_LB_SOURCE"},
		{map[string]string{"KTEL_LB_SOURCE": "kubernetes", "KTEL_LB_SERVICES_FILE": "testdata/services-ok.yaml"}, "KTEL_LB_SERVICES_FILE"},
		{map[string]string{"KTEL_LB_SOURCE": "file", "KTEL_PROBES": "lb"}, "KTEL_LB_SERVICES_FILE"},
	} {
		setenv(t, tc.env)
		_, err := config.Load(Probes())
		var ce *config.Error
		switch {
		case tc.wantVar == "" && err != nil:
			t.Errorf("%v: %v", tc.env, err)
		case tc.wantVar != "" && (!errors.As(err, &ce) || ce.Var != tc.wantVar):
			t.Errorf("%v: error %v, want one naming %s", tc.env, err, tc.wantVar)
		}
	}
}

// KTEL_SYSCALL_PER_CONTAINER needs workload attribution; the error names
// it and says what to set.
func TestSyscallPerContainerValidation(t *testing.T) {
	for _, tc := range []struct {
		env map[string]string
		ok  bool
	}{
		{map[string]string{"KTEL_SYSCALL_PER_CONTAINER": "true", "KTEL_NODE_NAME": "node-a"}, true},
		{map[string]string{"KTEL_SYSCALL_PER_CONTAINER": "true", "KTEL_NODE_NAME": "node-a", "KTEL_SYSCALL_TIMING": "list", "KTEL_SYSCALL_LIST": "read,write"}, true},
		{map[string]string{"KTEL_SYSCALL_PER_CONTAINER": "true", "KTEL_WORKLOAD_ATTRIBUTION": "cgroup"}, true},
		{map[string]string{"KTEL_SYSCALL_PER_CONTAINER": "false"}, true},
		{map[string]string{"KTEL_SYSCALL_PER_CONTAINER": "true"}, false},
		{map[string]string{"KTEL_SYSCALL_PER_CONTAINER": "true", "KTEL_NODE_NAME": "node-a", "KTEL_WORKLOAD_ATTRIBUTION": "off"}, false},
		{map[string]string{"KTEL_SYSCALL_PER_CONTAINER": "yes", "KTEL_NODE_NAME": "node-a"}, false},
	} {
		setenv(t, tc.env)
		c, err := config.Load(Probes())
		if tc.ok {
			if err != nil {
				t.Errorf("%v: %v", tc.env, err)
			} else if want := tc.env["KTEL_SYSCALL_PER_CONTAINER"] == "true"; c.SyscallPerContainer != want {
				t.Errorf("%v: SyscallPerContainer %v", tc.env, c.SyscallPerContainer)
			}
			continue
		}
		var ce *config.Error
		if !errors.As(err, &ce) || ce.Var != "KTEL_SYSCALL_PER_CONTAINER" || !strings.Contains(err.Error(), "KTEL_SYSCALL_PER_CONTAINER") {
			t.Errorf("%v: error %v, want one naming KTEL_SYSCALL_PER_CONTAINER", tc.env, err)
		}
		if tc.env["KTEL_SYSCALL_PER_CONTAINER"] == "true" && !strings.Contains(err.Error(), "KTEL_WORKLOAD_ATTRIBUTION=cgroup") {
			t.Errorf("%v: error %q does not say what to set", tc.env, err)
		}
	}
}

// The list and cgroup timing modes with what they need, and what the
// syscall probe is given from them.
func TestSyscallTimingInputs(t *testing.T) {
	// Without their input, the error names the variable to set.
	for mode, want := range map[string]string{"list": "KTEL_SYSCALL_LIST", "cgroup": "KTEL_SYSCALL_CGROUPS"} {
		setenv(t, map[string]string{"KTEL_SYSCALL_TIMING": mode})
		var ce *config.Error
		if _, err := config.Load(Probes()); !errors.As(err, &ce) || ce.Var != want {
			t.Errorf("KTEL_SYSCALL_TIMING=%s alone: %v, want an error about %s", mode, err, want)
		}
	}
	setenv(t, map[string]string{"KTEL_SYSCALL_TIMING": "list", "KTEL_SYSCALL_LIST": "getpid,close,getpid"})
	c, err := config.Load(Probes())
	if err != nil {
		t.Fatal(err)
	}
	nrs, err := syscallNumbers(c.SyscallList)
	if err != nil || !slices.Equal(nrs, []uint32{unix.SYS_GETPID, unix.SYS_CLOSE, unix.SYS_GETPID}) {
		t.Errorf("syscallNumbers = %v, %v", nrs, err)
	}

	root, err := cgroups.V2Root()
	if errors.Is(err, cgroups.ErrNoV2) {
		t.Skip("no cgroup v2 hierarchy mounted")
	} else if err != nil {
		t.Fatalf("cgroup v2 root: %v", err)
	}
	setenv(t, map[string]string{"KTEL_SYSCALL_TIMING": "cgroup", "KTEL_SYSCALL_CGROUPS": root})
	if c, err = config.Load(Probes()); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(root, &st); err != nil {
		t.Fatal(err)
	}
	if ids, err := cgroupIDs(c.SyscallCgroups); err != nil || !slices.Equal(ids, []uint64{st.Ino}) {
		t.Errorf("cgroupIDs = %v, %v; want the inode %d of %s", ids, err, st.Ino, root)
	}
}
