package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ktel-dev/ktel/internal/caps"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// asNobody runs the binary with `args` as uid/gid 65534 holding exactly
// the capabilities capList (setpriv names: "bpf,perfmon") as ambient
// capabilities, and returns its exit code and output.
func asNobody(t *testing.T, capList string, args ...string) (int, string) {
	t.Helper()
	bin := binary(t)
	// The build directory is private to root; nobody needs to traverse it.
	for dir := filepath.Dir(bin); dir != "/" && dir != os.TempDir(); dir = filepath.Dir(dir) {
		os.Chmod(dir, 0o755)
	}
	set := "-all"
	for _, c := range strings.Split(capList, ",") {
		if c != "" {
			set += ",+" + c
		}
	}
	cmd := exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups",
		"--inh-caps=" + set, "--ambient-caps=" + set, "--bounding-set=" + set, bin}, args...)...)
	cmd.Env = childEnv()
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("setpriv: %v", err)
	}
	return code, string(out)
}

// The default probes load as an ordinary user with CAP_BPF and CAP_PERFMON
// only; without one of them, ktel names it and the probe that needs it.
func TestLeastPrivilege(t *testing.T) {
	testenv.Privileged(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatal("setpriv (util-linux) is needed:", err)
	}
	code, out := asNobody(t, "bpf,perfmon", "check")
	if code != 0 || strings.Count(out, ": ok") != 3 {
		t.Fatalf("check as nobody with CAP_BPF,CAP_PERFMON: exit %d\n%s", code, out)
	}
	for _, tc := range []struct{ caps, missing string }{
		{"bpf", "CAP_PERFMON"},
		{"perfmon", "CAP_BPF"},
	} {
		code, out := asNobody(t, tc.caps, "check")
		if code != 1 {
			t.Errorf("check with only %s: exit %d, want 1\n%s", tc.caps, code, out)
		}
		for _, probe := range []string{"syscall", "runqlat", "tcpretrans"} {
			want := probe + ": failed: missing capability: probe " + probe + " needs " + tc.missing
			if !strings.Contains(out, want) {
				t.Errorf("check with only %s: output lacks %q:\n%s", tc.caps, want, out)
			}
		}
	}
}

// After attaching, every thread gives up what the probes no longer need:
// everything for the default probes, or what KTEL_KEEP_CAPABILITIES says.
func TestCapabilitiesDropped(t *testing.T) {
	testenv.Privileged(t)
	for _, tc := range []struct {
		keep string
		want caps.Set
	}{
		{"", 0}, // auto
		{"KTEL_KEEP_CAPABILITIES=CAP_BPF", caps.Of(caps.BPF)},
	} {
		var env []string
		if tc.keep != "" {
			env = append(env, tc.keep)
		}
		d := startDaemon(t, env...)
		threads, err := caps.ThreadsEffective(d.Cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		for tid, set := range threads {
			if set != tc.want {
				t.Errorf("%q: thread %d keeps %s, want %s", tc.keep, tid, set, tc.want)
			}
		}
		d.scrape(t, "text/plain") // still serves
		if st := d.stop(t, syscall.SIGTERM); st.ExitCode() != 0 {
			t.Errorf("%q: exit %d after SIGTERM without capabilities\n%s", tc.keep, st.ExitCode(), d.Stderr)
		}
	}
}
