// Package caps reads and drops the process's Linux capabilities: ktel
// checks before loading a probe that it holds what the probe needs, and
// gives up what it no longer needs once the probes are attached.
package caps

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Cap is a capability number (unix.CAP_*).
type Cap uint

// The capabilities ktel deals with.
const (
	NetAdmin    Cap = unix.CAP_NET_ADMIN
	SysAdmin    Cap = unix.CAP_SYS_ADMIN
	SysResource Cap = unix.CAP_SYS_RESOURCE
	Perfmon     Cap = unix.CAP_PERFMON
	BPF         Cap = unix.CAP_BPF
)

var names = map[Cap]string{NetAdmin: "CAP_NET_ADMIN", SysAdmin: "CAP_SYS_ADMIN",
	SysResource: "CAP_SYS_RESOURCE", Perfmon: "CAP_PERFMON", BPF: "CAP_BPF"}

func (c Cap) String() string {
	if n, ok := names[c]; ok {
		return n
	}
	return "CAP_" + strconv.Itoa(int(c))
}

// Parse accepts "CAP_BPF", "cap_bpf" or "bpf".
func Parse(s string) (Cap, error) {
	u := strings.ToUpper(strings.TrimSpace(s))
	if !strings.HasPrefix(u, "CAP_") {
		u = "CAP_" + u
	}
	for c, n := range names {
		if n == u {
			return c, nil
		}
	}
	return 0, fmt.Errorf("unknown capability %q (known: %s)", s, strings.Join(sortedNames(), ", "))
}

func sortedNames() []string {
	var out []string
	for _, n := range names {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Set is a set of capabilities.
type Set uint64

// Of returns the set of cs.
func Of(cs ...Cap) Set {
	var s Set
	for _, c := range cs {
		s |= 1 << c
	}
	return s
}

// Has reports whether s holds c, counting CAP_SYS_ADMIN as CAP_BPF and
// CAP_PERFMON, as the kernel does (and as kernels before 5.8 require).
func (s Set) Has(c Cap) bool {
	if s&(1<<c) != 0 {
		return true
	}
	return (c == BPF || c == Perfmon) && s&(1<<SysAdmin) != 0
}

// WithStandIns returns s plus CAP_SYS_ADMIN when s names CAP_BPF or
// CAP_PERFMON, held lacks it and held has CAP_SYS_ADMIN, which the kernel
// accepts in their place (before 5.8, or where a runtime grants only
// CAP_SYS_ADMIN). Keeping s alone would then drop what stands in for them.
func (s Set) WithStandIns(held Set) Set {
	for _, c := range []Cap{BPF, Perfmon} {
		if s&Of(c) != 0 && held&Of(c) == 0 && held&Of(SysAdmin) != 0 {
			return s | Of(SysAdmin)
		}
	}
	return s
}

// Missing returns the capabilities of need that s lacks.
func (s Set) Missing(need []Cap) []Cap {
	var out []Cap
	for _, c := range need {
		if !s.Has(c) {
			out = append(out, c)
		}
	}
	return out
}

// List returns the capabilities in s, in numeric order.
func (s Set) List() []Cap {
	var out []Cap
	for c := Cap(0); c < 64; c++ {
		if s&(1<<c) != 0 {
			out = append(out, c)
		}
	}
	return out
}

func (s Set) String() string {
	var n []string
	for _, c := range s.List() {
		n = append(n, c.String())
	}
	if len(n) == 0 {
		return "none"
	}
	return strings.Join(n, ",")
}

// Effective returns the calling thread's effective set (all of ktel's
// threads have the same until Drop).
func Effective() (Set, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, fmt.Errorf("capget: %w", err)
	}
	return Set(data[0].Effective) | Set(data[1].Effective)<<32, nil
}

// ErrCgo is returned by Drop in binaries built with cgo, where Go cannot
// change the capabilities of every thread.
var ErrCgo = errors.New("capabilities cannot be dropped in a binary built with cgo (build with CGO_ENABLED=0)")

// Drop reduces the permitted, effective and inheritable sets of every
// thread to keep (intersected with what is held), clears the ambient set,
// and sets no_new_privs so that nothing executed regains capabilities.
func Drop(keep Set) error {
	held, err := Effective()
	if err != nil {
		return err
	}
	keep &= held
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(keep), Permitted: uint32(keep)},
		{Effective: uint32(keep >> 32), Permitted: uint32(keep >> 32)},
	}
	check := func(name string, errno syscall.Errno) error {
		switch errno {
		case 0:
			return nil
		case syscall.ENOTSUP:
			return ErrCgo
		}
		return fmt.Errorf("%s: %w", name, errno)
	}
	if _, _, errno := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); errno != 0 {
		return check("prctl(PR_SET_NO_NEW_PRIVS)", errno)
	}
	if _, _, errno := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0); errno != 0 {
		return check("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", errno)
	}
	// The pointers are converted in the call itself, as
	// //go:uintptrescapes requires.
	if _, _, errno := syscall.AllThreadsSyscall(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); errno != 0 {
		return check("capset", errno)
	}
	return nil
}

// ThreadsEffective returns the effective set of every thread of pid, read
// from /proc, for tests and diagnostics.
func ThreadsEffective(pid int) (map[int]Set, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[int]Set{}
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(dir + "/" + e.Name() + "/status")
		if err != nil {
			continue // the thread exited
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
				n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
				if err != nil {
					return nil, fmt.Errorf("thread %d: CapEff %q: %w", tid, v, err)
				}
				out[tid] = Set(n)
			}
		}
	}
	return out, nil
}
