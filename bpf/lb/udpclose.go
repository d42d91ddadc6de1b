package lb

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	ctl "github.com/ktel-dev/ktel/internal/lb"
)

// udpCloser closes connected UDP sockets that the load balancer sent to a
// backend that has since left the service: a connected UDP socket is
// rewritten once, at connect, and would otherwise keep sending to the old
// backend for its whole life. Kernels 6.5+ do it with a BPF socket
// iterator calling bpf_sock_destroy (sockdestroy.bpf.c); older ones with
// sock_diag's SOCK_DESTROY request, which needs CONFIG_INET_DIAG_DESTROY.
// Either way the socket's next receive (or SO_ERROR) gives ECONNABORTED
// and a send EDESTADDRREQ: it is no longer connected.
//
// Sockets are looked for in the network namespaces of the processes of the
// load-balanced cgroup (a socket iterator and sock_diag both see one
// namespace): a socket whose owner left the cgroup, or that was passed to
// a process in a namespace no cgroup member is in, is not found.
type udpCloser struct {
	cgroup  string
	reverse *ebpf.Map
	log     *slog.Logger

	// Iterator mode, nil otherwise.
	iter *ebpf.Program
	gone *ebpf.Map

	closed   atomic.Uint64
	warnOnce sync.Once
	// missed counts the processes of the cgroup whose network namespace
	// could not be read or entered, per closing pass (without hostPID
	// cgroup.procs lists them as PID 0; without CAP_SYS_PTRACE and
	// CAP_SYS_ADMIN their namespaces cannot be read or entered).
	missed       atomic.Uint64
	missWarnOnce sync.Once
}

// newUDPCloser loads the iterator where the kernel allows it (6.5+),
// sharing lb_reverse, and falls back to sock_diag otherwise.
func newUDPCloser(cgroup string, reverse *ebpf.Map, maxGone int, noIter bool, log *slog.Logger) *udpCloser {
	c := &udpCloser{cgroup: cgroup, reverse: reverse, log: log}
	if noIter {
		return c
	}
	spec, err := loadSockdestroy()
	if err != nil {
		log.Warn("socket iterator spec", "err", err)
		return c
	}
	spec.Maps["lb_destroy"].MaxEntries = uint32(maxGone)
	spec.Maps["lb_reverse"].MaxEntries = reverse.MaxEntries() // replaced by it
	var objs sockdestroyObjects
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{"lb_reverse": reverse}}
	if err := spec.LoadAndAssign(&objs, opts); err != nil {
		log.Info("bpf_sock_destroy unavailable (Linux 6.5+): closing connected UDP sockets to removed backends through sock_diag", "err", err)
		return c
	}
	// With MapReplacements, cilium/ebpf assigns a clone of the
	// replacement (its own file descriptor): closed, reverse stays.
	if err := objs.LbReverse.Close(); err != nil {
		log.Warn("close lb_reverse clone", "err", err)
	}
	c.iter, c.gone = objs.LbUdpDestroy, objs.LbDestroy
	return c
}

// Mode is how sockets are closed: "bpf_sock_destroy" or "sock_diag".
func (c *udpCloser) mode() string {
	if c.iter != nil {
		return "bpf_sock_destroy"
	}
	return "sock_diag"
}

func (c *udpCloser) Close() error {
	if c.iter == nil {
		return nil
	}
	err := errors.Join(c.iter.Close(), c.gone.Close())
	c.iter, c.gone = nil, nil
	return err
}

// errNoDestroy: the kernel cannot close other processes' sockets.
var errNoDestroy = errors.New("kernel without CONFIG_INET_DIAG_DESTROY (and without bpf_sock_destroy, Linux 6.5+)")

// disconnect closes the connected UDP sockets sent to removed backends.
func (c *udpCloser) disconnect(removed []ctl.Removed) (int, error) {
	gone := make(map[sockdestroyGoneKey]bool, len(removed))
	for _, r := range removed {
		bw, bf := addrWords(r.Backend.Addr())
		vw, vf := addrWords(r.Key.VIP.Addr())
		gone[sockdestroyGoneKey{
			Backend: sockdestroyRevVal{Addr: bw, Port: netPort(r.Backend.Port()), Family: bf},
			Vip:     sockdestroyRevVal{Addr: vw, Port: netPort(r.Key.VIP.Port()), Family: vf},
		}] = true
	}
	nss, unseen, err := cgroupNetns(c.cgroup)
	if err != nil {
		return 0, err
	}
	if unseen > 0 {
		c.missedNetns(unseen, "a process of the cgroup outside ktel's PID namespace (listed as PID 0), or its namespace not readable")
	}
	if c.iter != nil {
		keys := make([]sockdestroyGoneKey, 0, len(gone))
		for k := range gone {
			keys = append(keys, k)
		}
		if len(keys) > int(c.gone.MaxEntries()) {
			keys = keys[:c.gone.MaxEntries()]
			c.log.Warn("more removed UDP backends than lb_destroy holds: some sockets stay connected", "removed", len(gone))
		}
		ones := make([]uint8, len(keys))
		for i := range ones {
			ones[i] = 1
		}
		if err := batchUpdate(c.gone, keys, ones); err != nil {
			return 0, fmt.Errorf("fill lb_destroy: %w", err)
		}
		defer func() {
			for _, k := range keys {
				_ = c.gone.Delete(k)
			}
		}()
	}
	var (
		total int
		errs  []error
	)
	for _, ns := range nss {
		n, err := inNetns(ns, func() (int, error) {
			if c.iter != nil {
				return c.runIter()
			}
			return c.sockDiag(gone)
		})
		total += n
		if errors.Is(err, errNoDestroy) {
			c.warnOnce.Do(func() {
				c.log.Warn("cannot close connected UDP sockets of removed backends: they keep sending to them", "err", err)
			})
			c.closed.Add(uint64(total)) // those closed before it
			return total, err
		}
		var ne *netnsError
		switch {
		case err == nil, errors.Is(err, fs.ErrNotExist): // the process exited
		case errors.As(err, &ne):
			c.missedNetns(1, err.Error())
		default:
			errs = append(errs, fmt.Errorf("netns %s: %w", ns, err))
		}
	}
	c.closed.Add(uint64(total))
	return total, errors.Join(errs...)
}

// missedNetns counts n processes (or namespaces) of the cgroup whose
// sockets could not be looked at, and warns about it once.
func (c *udpCloser) missedNetns(n int, why string) {
	c.missed.Add(uint64(n))
	c.missWarnOnce.Do(func() {
		c.log.Warn("connected UDP sockets to removed backends not closed in other network namespaces: ktel needs the host's PID namespace (hostPID) and CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_NET_ADMIN (KTEL_KEEP_CAPABILITIES); counted in ktel_lb_datapath_errors_total{reason=\"udp_close\"}",
			"cgroup", c.cgroup, "why", why)
	})
}

// netnsError: a namespace could not be entered (open or setns failed).
type netnsError struct{ err error }

func (e *netnsError) Error() string { return e.err.Error() }
func (e *netnsError) Unwrap() error { return e.err }

// runIter runs the iterator once in the calling thread's namespace; it
// writes the cookie of each socket it closed.
func (c *udpCloser) runIter() (int, error) {
	l, err := link.AttachIter(link.IterOptions{Program: c.iter})
	if err != nil {
		return 0, fmt.Errorf("attach iterator: %w", err)
	}
	defer l.Close()
	r, err := l.Open()
	if err != nil {
		return 0, fmt.Errorf("open iterator: %w", err)
	}
	defer r.Close()
	n, err := io.Copy(io.Discard, r)
	if err != nil {
		return 0, fmt.Errorf("read iterator: %w", err)
	}
	return int(n / 8), nil
}

// ownNetns stands for ktel's own network namespace in cgroupNetns's
// answer: it needs no setns (nor the capabilities setns and reading other
// processes' namespaces need).
const ownNetns = ""

// cgroupNetns returns a /proc/PID/ns/net path for each network namespace
// the processes of cgroup (and of its descendants) are in, and ownNetns
// for ktel's own, always first. A namespace ktel may not read (without
// CAP_SYS_PTRACE, that of a process with more capabilities), or of a
// process outside ktel's PID namespace (without hostPID; cgroup.procs
// lists such a process as PID 0), is skipped and counted in unseen. A
// process that exited since cgroup.procs was read is skipped, not
// counted: it has no sockets left to close.
func cgroupNetns(cgroup string) (_ []string, unseen int, _ error) {
	seen := map[uint64]bool{}
	out := []string{ownNetns}
	var self unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &self); err != nil {
		return nil, 0, fmt.Errorf("own network namespace: %w", err)
	}
	seen[self.Ino] = true
	err := filepath.WalkDir(cgroup, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) { // removed meanwhile
				return nil
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		procs, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil // removed meanwhile, or not readable: skipped
		}
		for _, f := range strings.Fields(string(procs)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			if pid == 0 { // outside ktel's PID namespace
				unseen++
				continue
			}
			p := "/proc/" + f + "/ns/net"
			var st unix.Stat_t
			if err := unix.Stat(p, &st); err != nil {
				if !errors.Is(err, unix.ENOENT) { // ENOENT: exited
					unseen++
				}
				continue
			}
			if seen[st.Ino] {
				continue
			}
			seen[st.Ino] = true
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		return nil, 0, fmt.Errorf("processes of %s: %w", cgroup, err)
	}
	return out, unseen, nil
}

// inNetns runs f on a thread that joined the namespace at path. The thread
// is not reused afterwards: Go discards a goroutine's locked thread when
// the goroutine ends.
func inNetns(path string, f func() (int, error)) (int, error) {
	type result struct {
		n   int
		err error
	}
	if path == ownNetns {
		return f()
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) { // the process exited
			ch <- result{err: fmt.Errorf("open: %w", err)}
			return
		}
		if err != nil {
			ch <- result{err: &netnsError{fmt.Errorf("open %s: %w", path, err)}}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			ch <- result{err: &netnsError{fmt.Errorf("setns %s: %w", path, err)}}
			return
		}
		n, err := f()
		ch <- result{n, err}
	}()
	r := <-ch
	return r.n, r.err
}

// sock_diag, from linux/inet_diag.h.
type inetDiagSockID struct {
	SPort, DPort uint16 // network order
	Src, Dst     [4]uint32
	If           uint32
	Cookie       [2]uint32
}

type inetDiagReqV2 struct {
	Family, Protocol, Ext, Pad uint8
	States                     uint32
	ID                         inetDiagSockID
}

type inetDiagMsg struct {
	Family, State, Timer, Retrans uint8
	ID                            inetDiagSockID
	Expires, RQueue, WQueue, UID  uint32
	Inode                         uint32
}

const tcpEstablished = 1 // the state of a connected UDP socket

// sockDiag lists the connected UDP sockets of the calling thread's
// namespace and destroys those the load balancer sent to a gone backend.
func (c *udpCloser) sockDiag(gone map[sockdestroyGoneKey]bool) (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return 0, fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 5}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	var victims []inetDiagReqV2
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		req := inetDiagReqV2{Family: family, Protocol: unix.IPPROTO_UDP, States: 1 << tcpEstablished}
		err := netlinkDo(fd, unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_DUMP, &req, func(data []byte) {
			if len(data) < int(unsafe.Sizeof(inetDiagMsg{})) {
				return
			}
			m := *(*inetDiagMsg)(unsafe.Pointer(&data[0]))
			if c.ours(m, gone) {
				victims = append(victims, inetDiagReqV2{Family: m.Family, Protocol: unix.IPPROTO_UDP, States: ^uint32(0), ID: m.ID})
			}
		})
		if err != nil {
			return 0, fmt.Errorf("list UDP sockets: %w", err)
		}
	}
	n := 0
	var errs []error
	for i := range victims {
		err := netlinkDo(fd, unix.SOCK_DESTROY, unix.NLM_F_ACK, &victims[i], nil)
		switch {
		case err == nil:
			n++
		case errors.Is(err, unix.EOPNOTSUPP):
			return n, fmt.Errorf("%w: %w", errNoDestroy, err)
		case errors.Is(err, unix.ENOENT): // closed meanwhile
		default:
			errs = append(errs, fmt.Errorf("destroy: %w", err))
		}
	}
	return n, errors.Join(errs...)
}

// ours reports whether the load balancer connected the socket of m to a
// backend in gone (lb_reverse remembers the VIP it was sent to).
func (c *udpCloser) ours(m inetDiagMsg, gone map[sockdestroyGoneKey]bool) bool {
	rk := lbRevKey{Cookie: uint64(m.ID.Cookie[0]) | uint64(m.ID.Cookie[1])<<32, Addr: m.ID.Dst, Port: m.ID.DPort, Family: 4}
	switch {
	case m.Family == unix.AF_INET:
		rk.Addr = [4]uint32{m.ID.Dst[0]}
	case rk.Addr[0] == 0 && rk.Addr[1] == 0 && rk.Addr[2] == nativeWord([]byte{0, 0, 0xff, 0xff}):
		rk.Addr = [4]uint32{m.ID.Dst[3]}
	default:
		rk.Family = 6
	}
	var vip lbRevVal
	if err := c.reverse.Lookup(rk, &vip); err != nil {
		return false
	}
	return gone[sockdestroyGoneKey{
		Backend: sockdestroyRevVal{Addr: rk.Addr, Port: rk.Port, Family: rk.Family},
		Vip:     sockdestroyRevVal{Addr: vip.Addr, Port: vip.Port, Family: vip.Family},
	}]
}

// netlinkDo sends one request and reads the answers until the end of a
// dump or an acknowledgement, passing each message's payload to each.
func netlinkDo(fd int, typ, flags uint16, req *inetDiagReqV2, each func([]byte)) error {
	size := unix.SizeofNlMsghdr + int(unsafe.Sizeof(*req))
	msg := make([]byte, size)
	hdr := (*unix.NlMsghdr)(unsafe.Pointer(&msg[0]))
	*hdr = unix.NlMsghdr{Len: uint32(size), Type: typ, Flags: unix.NLM_F_REQUEST | flags, Seq: 1}
	*(*inetDiagReqV2)(unsafe.Pointer(&msg[unix.SizeofNlMsghdr])) = *req
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	buf := make([]byte, 32<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return fmt.Errorf("parse: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case syscall.NLMSG_DONE:
				return nil
			case syscall.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return errors.New("short netlink error")
				}
				if e := int32(binary.NativeEndian.Uint32(m.Data[:4])); e != 0 {
					return unix.Errno(-e)
				}
				return nil // the acknowledgement
			default:
				if each != nil {
					each(m.Data)
				}
			}
		}
	}
}
