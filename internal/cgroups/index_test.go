package cgroups_test

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/testenv"
)

const testID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// The walk and the TTL on an ordinary directory tree: ids are inode
// numbers on any file system.
func TestIndexTTL(t *testing.T) {
	root := t.TempDir()
	ctr := filepath.Join(root, "kubepods", "besteffort", "pod5d3c1f2a-8b4e-4c6d-9e0f-1a2b3c4d5e6f", testID)
	svc := filepath.Join(root, "system.slice", "foo.service")
	for _, d := range []string{ctr, svc} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ctrID, err := cgroups.ID(ctr)
	if err != nil {
		t.Fatal(err)
	}
	svcID, _ := cgroups.ID(svc)

	const ttl = time.Minute
	x := cgroups.NewIndex(root, ttl)
	t0 := time.Unix(1000, 0)
	if err := x.Refresh(t0); err != nil {
		t.Fatal(err)
	}
	c, ok := x.Lookup(ctrID)
	if !ok || c.Workload.ContainerID != testID || c.Path != "/kubepods/besteffort/pod5d3c1f2a-8b4e-4c6d-9e0f-1a2b3c4d5e6f/"+testID {
		t.Fatalf("Lookup(container) = %+v, %v", c, ok)
	}
	if c, ok := x.Lookup(svcID); !ok || c.Workload.Unit != "foo.service" {
		t.Fatalf("Lookup(service) = %+v, %v", c, ok)
	}
	rootID, _ := cgroups.ID(root)
	if c, ok := x.Lookup(rootID); !ok || c.Path != "/" {
		t.Fatalf("Lookup(root) = %+v, %v", c, ok)
	}

	if err := os.Remove(ctr); err != nil {
		t.Fatal(err)
	}
	// Still resolvable until the TTL has passed since a walk missed it.
	if err := x.Refresh(t0.Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if c, ok := x.Lookup(ctrID); !ok || !c.Gone.Equal(t0.Add(10*time.Second)) {
		t.Fatalf("removed container right after: %+v, %v", c, ok)
	}
	if err := x.Refresh(t0.Add(10*time.Second + ttl - time.Nanosecond)); err != nil {
		t.Fatal(err)
	}
	if _, ok := x.Lookup(ctrID); !ok {
		t.Fatal("removed container forgotten before its TTL")
	}
	if err := x.Refresh(t0.Add(10*time.Second + ttl)); err != nil {
		t.Fatal(err)
	}
	if c, ok := x.Lookup(ctrID); ok {
		t.Fatalf("removed container still known after its TTL: %+v", c)
	}
	if _, ok := x.Lookup(svcID); !ok {
		t.Fatal("existing service forgotten")
	}
}

func TestIndexMissingRoot(t *testing.T) {
	x := cgroups.NewIndex(filepath.Join(t.TempDir(), "nope"), time.Minute)
	if err := x.Refresh(time.Now()); err == nil {
		t.Fatal("Refresh of a missing root: no error")
	}
}

// On the real cgroup v2 hierarchy, a cgroup's inode number is the id the
// kernel gives it (its file handle, as BPF's bpf_get_current_cgroup_id
// returns), and the index finds cgroups created below a test's own child.
func TestIndexCgroupV2(t *testing.T) {
	testenv.Privileged(t)
	root, err := cgroups.V2Root()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, fmt.Sprintf("ktel-test-cgroups-%d", os.Getpid()))
	svc := filepath.Join(dir, "system.slice", "bar.service")
	if err := os.MkdirAll(svc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, d := range []string{svc, filepath.Dir(svc), dir} {
			if err := os.Remove(d); err != nil {
				t.Error(err)
			}
		}
	})
	id, err := cgroups.ID(svc)
	if err != nil {
		t.Fatal(err)
	}
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, svc, 0)
	if err != nil {
		t.Fatal(err)
	}
	if kid := binary.NativeEndian.Uint64(h.Bytes()); kid != id {
		t.Fatalf("inode %d, kernel cgroup id %d", id, kid)
	}
	x := cgroups.NewIndex(root, time.Minute)
	if err := x.Refresh(time.Now()); err != nil {
		t.Fatal(err)
	}
	c, ok := x.Lookup(id)
	if want := "/" + filepath.Base(dir) + "/system.slice/bar.service"; !ok || c.Path != want || c.Workload.Unit != "bar.service" {
		t.Fatalf("Lookup = %+v, %v; want path %s, unit bar.service", c, ok, want)
	}
}

// Cgroups that come and go during walks are skipped, never an error.
func TestIndexRefreshRacesRemoval(t *testing.T) {
	root := t.TempDir()
	x := cgroups.NewIndex(root, time.Minute)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			d := filepath.Join(root, fmt.Sprintf("kubepods/pod%d/c%d/x", i%7, i%3))
			os.MkdirAll(d, 0o755)
			os.RemoveAll(filepath.Join(root, "kubepods", fmt.Sprintf("pod%d", (i+3)%7)))
		}
	}()
	for range 300 {
		if err := x.Refresh(time.Now()); err != nil {
			close(stop)
			<-done
			t.Fatalf("Refresh while cgroups vanish: %v", err)
		}
	}
	close(stop)
	<-done
}
