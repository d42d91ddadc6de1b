package deploy

import (
	"bytes"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// TestCapabilities backs what deploy/ says about privileges, with
// `ktel check` (load and attach every probe, then exit):
//   - uid 0 holding only BPF, PERFMON and NET_ADMIN (the Kubernetes
//     DaemonSet and the image) loads every probe;
//   - a non-root uid with them as ambient capabilities (the systemd unit)
//     does too;
//   - a non-root uid that is merely allowed them (bounding set), which is
//     all Kubernetes' runAsNonRoot with capabilities.add can give without
//     ambient capabilities, loads none.
//
// CAP_SYS_RESOURCE is left out: it only raises RLIMIT_MEMLOCK on kernels
// before 5.11.
func TestCapabilities(t *testing.T) {
	testenv.Privileged(t)
	bin := binary(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatal("setpriv (util-linux) not found")
	}
	caps := []uintptr{unix.CAP_BPF, unix.CAP_PERFMON, unix.CAP_NET_ADMIN}
	env := []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "KTEL_LOG_FORMAT=json"}
	if slices.Contains(probes(t), "netdev") {
		env = append(env, "KTEL_INTERFACES=lo") // exercises CAP_NET_ADMIN
	}
	const nobody = 65534

	tests := []struct {
		name   string
		cmd    func() *exec.Cmd
		wantOK bool
	}{
		{"uid 0 with only BPF,PERFMON,NET_ADMIN", func() *exec.Cmd {
			return exec.Command(setpriv, "--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon,+net_admin", "--no-new-privs", bin, "check")
		}, true},
		{"non-root with ambient BPF,PERFMON,NET_ADMIN", func() *exec.Cmd {
			c := exec.Command(bin, "check")
			c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}, AmbientCaps: caps}
			return c
		}, true},
		{"non-root without ambient capabilities", func() *exec.Cmd {
			c := exec.Command(bin, "check")
			c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
			return c
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testenv.Privileged(t)
			cmd := tt.cmd()
			cmd.Env = env
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			cmd.WaitDelay = time.Second
			timer := time.AfterFunc(30*time.Second, func() { cmd.Process.Kill() })
			err := cmd.Run()
			timer.Stop()
			if cmd.ProcessState == nil {
				t.Fatalf("run: %v", err)
			}
			ok := cmd.ProcessState.ExitCode() == 0
			t.Logf("exit %d\n%s", cmd.ProcessState.ExitCode(), &stdout)
			if ok != tt.wantOK {
				t.Errorf("ktel check exit status %d, want success %v\nstdout:\n%s\nstderr:\n%s", cmd.ProcessState.ExitCode(), tt.wantOK, &stdout, &stderr)
			}
			if !tt.wantOK && !strings.Contains(stdout.String()+stderr.String(), "missing capability") {
				t.Errorf("ktel check does not say a capability is missing\nstdout:\n%s\nstderr:\n%s", &stdout, &stderr)
			}
		})
	}
}
