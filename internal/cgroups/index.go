package cgroups

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrNoV2 means no cgroup v2 hierarchy is mounted (a cgroup v1-only host):
// BPF programs then read no meaningful cgroup id, and nothing can be
// attributed.
var ErrNoV2 = errors.New("no cgroup2 file system mounted")

// V2Root returns where the cgroup v2 hierarchy is mounted, from
// /proc/self/mountinfo: /sys/fs/cgroup on unified hosts,
// /sys/fs/cgroup/unified on hybrid ones.
func V2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	return v2Mount(f)
}

// v2Mount finds the first cgroup2 mount point in a mountinfo file.
func v2Mount(r io.Reader) (string, error) {
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
		pre, post, ok := strings.Cut(s.Text(), " - ")
		if !ok {
			continue
		}
		fields, after := strings.Fields(pre), strings.Fields(post)
		if len(fields) >= 5 && len(after) >= 1 && after[0] == "cgroup2" {
			return unescapeMount(fields[4]), nil
		}
	}
	if err := s.Err(); err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	return "", ErrNoV2
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			v, ok := byte(0), true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + c - '0'
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ID returns the cgroup id of a cgroup v2 directory: its inode number, the
// value bpf_get_current_cgroup_id returns for its processes.
func ID(dir string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// Cgroup is a cgroup the index knows.
type Cgroup struct {
	Path     string // relative to the v2 root, starting with "/"
	Workload Workload
	// Gone is when a walk first missed the cgroup; zero while it exists.
	Gone time.Time
}

// Index maps cgroup ids to cgroups, from walks of the cgroup v2 hierarchy.
// Lookups answer from the last walk and never touch the file system; a
// cgroup that a walk misses stays for the TTL after, so that the last
// events of a finished container are still attributed.
type Index struct {
	root string
	ttl  time.Duration

	mu   sync.RWMutex
	byID map[uint64]*Cgroup
}

// NewIndex returns an empty index of the hierarchy mounted at root.
func NewIndex(root string, ttl time.Duration) *Index {
	return &Index{root: root, ttl: ttl, byID: map[uint64]*Cgroup{}}
}

// Root is the hierarchy's mount point.
func (x *Index) Root() string { return x.root }

// Lookup returns the cgroup with id.
func (x *Index) Lookup(id uint64) (Cgroup, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	c, ok := x.byID[id]
	if !ok {
		return Cgroup{}, false
	}
	return *c, true
}

// Len is the number of cgroups known, gone ones included.
func (x *Index) Len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.byID)
}

// Refresh walks the hierarchy at now: new cgroups are added, missing ones
// marked gone, and those gone for longer than the TTL forgotten. Cgroups
// that vanish during the walk are skipped, not errors; only a root that
// cannot be read is.
func (x *Index) Refresh(now time.Time) error {
	seen := make(map[uint64]string, x.Len()+16)
	err := filepath.WalkDir(x.root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path == x.root {
				return err
			}
			// Removed between listing and reading: it is gone.
			return fs.SkipDir
		}
		if !d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return fs.SkipDir
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("%s: no inode number", path)
		}
		rel, _ := filepath.Rel(x.root, path)
		seen[st.Ino] = "/" + strings.TrimPrefix(filepath.ToSlash(rel), ".")
		return nil
	})
	if err != nil {
		return fmt.Errorf("walk cgroups at %s: %w", x.root, err)
	}

	x.mu.Lock()
	defer x.mu.Unlock()
	for id, path := range seen {
		if c, ok := x.byID[id]; ok && c.Path == path {
			c.Gone = time.Time{}
			continue
		}
		// New, or an inode number reused by another cgroup.
		x.byID[id] = &Cgroup{Path: path, Workload: ParsePath(path)}
	}
	for id, c := range x.byID {
		if _, ok := seen[id]; ok {
			continue
		}
		if c.Gone.IsZero() {
			c.Gone = now
		}
		if now.Sub(c.Gone) >= x.ttl {
			delete(x.byID, id)
		}
	}
	return nil
}
