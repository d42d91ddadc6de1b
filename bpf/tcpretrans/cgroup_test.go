package tcpretrans_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// With PerCgroup, a SYN retransmitted by a socket that a process in a
// cgroup of the test created (in a network namespace of the test) is
// counted under that cgroup, although the retransmit runs from a timer,
// not in the process; the other cgroup gets nothing.
func TestPerCgroup(t *testing.T) {
	testenv.Privileged(t)
	root, err := cgroups.V2Root()
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(root, fmt.Sprintf("ktel-test-tcpretrans-%d", os.Getpid()))
	ids := map[string]uint64{}
	for _, dir := range []string{base, filepath.Join(base, "client"), filepath.Join(base, "idle")} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := os.Remove(dir); err != nil {
				t.Error(err)
			}
		})
		if ids[filepath.Base(dir)], err = cgroups.ID(dir); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tcpretrans.Load(tcpretrans.Options{Peers: true, PerCgroup: true}, discard()); err == nil {
		t.Error("loaded counting by peer and cgroup at once")
	}
	p, rd := testenv.LoadWithEvents(t, func() (*tcpretrans.Probe, error) {
		return tcpretrans.Load(tcpretrans.Options{PerCgroup: true, Spans: probe.SpanOptions{Always: true}}, discard())
	})
	if _, ok := p.BoundedMaps()["tcp_rtx_cgroups"]; !ok {
		t.Error("the cgroup map is not among the bounded maps")
	}

	pair := newPair(t, 0)
	firewall(t, pair.server, "INPUT", "-p", "tcp", "--syn", "-j", "DROP")
	dir, err := os.Open(filepath.Join(base, "client"))
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	before, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	// bash connects; the SYN is dropped and retransmitted after 1 s; the
	// connect is cut at synWait.
	cmd := exec.Command("ip", "netns", "exec", pair.client, "timeout", fmt.Sprintf("%.1f", synWait.Seconds()),
		"bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/%s/7", pair.serverAddrs[0]))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	// timeout exits 124 when it cut the connect; anything else (bash or
	// timeout missing, say) means no SYN was sent.
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Fatalf("connected through a firewall: %s", out)
	} else if ee, ok := errors.AsType[*exec.ExitError](err); !ok || ee.ExitCode() != 124 {
		t.Fatalf("connect from the client cgroup: %v, want timeout's status 124 (the SYN dropped)\n%s", err, out)
	}
	after, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	k := tcpretrans.CgroupKey{Key: synSent, Cgroup: ids["client"]}
	if n := after.Cgroups[k] - before.Cgroups[k]; n < 1 {
		t.Errorf("client cgroup: %d SYN retransmits, want at least 1; counts %v", n, after.Cgroups)
	}
	for ck, n := range after.Cgroups {
		if ck.Cgroup == ids["idle"] || ck.Cgroup == ids[filepath.Base(base)] {
			t.Errorf("%v: %d retransmits in a cgroup without sockets", ck, n)
		}
	}
	var spans int
	for _, e := range testenv.Records(t, rd, 100*time.Millisecond, tcpretrans.DecodeEvent) {
		if e.Remote.Addr() == pair.serverAddrs[0] {
			spans++
			if e.Cgroup != ids["client"] {
				t.Errorf("event of the test's SYN: cgroup %d, want the client's %d", e.Cgroup, ids["client"])
			}
		}
	}
	if spans == 0 {
		t.Error("no event of the test's SYN retransmit")
	}
	if after.CgroupMapFull != 0 {
		t.Errorf("%d retransmits found the cgroup map full", after.CgroupMapFull)
	}
	if err := p.ForgetCgroup(k); err != nil {
		t.Fatal(err)
	}
	s, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Cgroups[k]; ok {
		t.Error("a forgotten cgroup is still counted")
	}
	if err := p.ForgetCgroup(k); err != nil {
		t.Errorf("forgetting twice: %v", err)
	}
}
