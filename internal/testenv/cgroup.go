package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/cgroups"
)

// TestCgroup makes a child of the cgroup v2 root for the test, named
// after name and the process, and returns its path. It is removed when the
// test ends, after what SubCgroup and StartInCgroup made below it.
func TestCgroup(tb testing.TB, name string) string {
	tb.Helper()
	root, err := cgroups.V2Root()
	if err != nil {
		tb.Fatal(err)
	}
	dir := filepath.Join(root, fmt.Sprintf("ktel-test-%s-%d", name, os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { removeCgroup(tb, dir) })
	return dir
}

// SubCgroup makes the cgroup at rel below base, and the missing ones on
// the way, and returns it opened, for StartInCgroup; its id is
// cgroups.ID of its path (f.Name()). All are removed when the test ends.
func SubCgroup(tb testing.TB, base, rel string) *os.File {
	tb.Helper()
	dir := base
	for _, p := range strings.Split(rel, "/") {
		dir = filepath.Join(dir, p)
		if err := os.Mkdir(dir, 0o755); err == nil {
			made := dir
			tb.Cleanup(func() { removeCgroup(tb, made) })
		} else if !os.IsExist(err) {
			tb.Fatal(err)
		}
	}
	f, err := os.Open(dir)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	return f
}

// KubepodsPath is the cgroup of a container of pod uid in kubelet's
// systemd layout (QoS class besteffort, containerd).
func KubepodsPath(uid, containerID string) string {
	return "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" +
		strings.ReplaceAll(uid, "-", "_") + ".slice/cri-containerd-" + containerID + ".scope"
}

// KubepodsCgroupfsPath is the cgroup of a container of pod uid in
// kubelet's cgroupfs layout (QoS class burstable, containerd): the uid
// keeps its dashes and the container's cgroup is its bare id.
func KubepodsCgroupfsPath(uid, containerID string) string {
	return "kubepods/burstable/pod" + uid + "/" + containerID
}

// StartInCgroup starts argv in the cgroup dir (clone3's
// CLONE_INTO_CGROUP, so that it runs nothing outside); it is killed when
// the test ends, if it has not exited.
func StartInCgroup(tb testing.TB, dir *os.File, argv ...string) *exec.Cmd {
	tb.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

// removeCgroup removes dir, waiting a moment for the kernel to empty it
// of the processes just reaped.
func removeCgroup(tb testing.TB, dir string) {
	var err error
	for range 50 {
		if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	tb.Errorf("remove cgroup %s: %v", dir, err)
}
