package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
)

// Addresses. VIPs are 10.96.0.1 onwards (100,000 services reach
// 10.97.134.160), port 80; backends listen on 127.0.0.2, 127.0.0.3, ...
// port 8080 in every namespace, and every service shares them.
var (
	vipBase   = netip.MustParseAddr("10.96.0.1")
	vipRange  = "10.96.0.0/12"
	vipPort   = uint16(80)
	backendIP = netip.MustParseAddr("127.0.0.2")
	backPort  = uint16(8080)
)

// env is what the benchmark creates and must remove: network namespaces,
// a cgroup with two children, listeners, client processes and a temporary
// directory.
//
// Namespace "lb" has loopback and nothing else: a connect to a VIP that
// the lb programs did not rewrite fails with ENETUNREACH. The kernel
// routes a connect before netfilter's nat OUTPUT hook sees its SYN, so
// iptables DNAT only happens to a VIP that has a route (kube-proxy nodes
// have a default route). The iptables namespaces therefore get one route,
// "local 10.96.0.0/12 dev lo": VIPs are delivered on loopback like
// 127.0.0.0/8, nothing can leave, and a connect that no rule translated
// fails with ECONNREFUSED. Each iptables backend has its own namespace,
// since rules of both would otherwise apply to every packet.
type env struct {
	tmp      string
	ns       map[string]string // role (lb, nft, legacy) -> namespace name
	cgParent string
	cgLB     string // the lb programs are attached here; only the ktel client joins it
	cgLB1    string // a second probe with one service, the reference
	cgPlain  string // the other clients: no programs

	mu        sync.Mutex
	listeners []net.Listener
	wg        sync.WaitGroup
	clients   []*client
}

func nsName(role string) string { return fmt.Sprintf("ktel-bench-lb-%d-%s", os.Getpid(), role) }

func newEnv(roles []string, endpoints int) (e *env, err error) {
	e = &env{ns: map[string]string{}}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	if e.tmp, err = os.MkdirTemp("", "ktel-bench-lb-"); err != nil {
		return e, err
	}
	for _, role := range roles {
		name := nsName(role)
		if err := cmd("ip", "netns", "add", name); err != nil {
			return e, err
		}
		e.ns[role] = name
		if err := cmd("ip", "-n", name, "link", "set", "lo", "up"); err != nil {
			return e, err
		}
		if role != "lb" {
			if err := cmd("ip", "-n", name, "route", "add", "local", vipRange, "dev", "lo"); err != nil {
				return e, err
			}
		}
		for i := range endpoints {
			if err := e.serve(name, backendAddr(i)); err != nil {
				return e, err
			}
		}
	}

	root, err := cgroups.V2Root()
	if err != nil {
		return e, err
	}
	e.cgParent = filepath.Join(root, fmt.Sprintf("ktel-bench-lb-%d", os.Getpid()))
	if err := os.Mkdir(e.cgParent, 0o755); err != nil {
		e.cgParent = ""
		return e, err
	}
	for _, c := range []struct {
		dir  *string
		name string
	}{{&e.cgLB, "lb"}, {&e.cgLB1, "lb1"}, {&e.cgPlain, "plain"}} {
		p := filepath.Join(e.cgParent, c.name)
		if err := os.Mkdir(p, 0o755); err != nil {
			return e, err
		}
		*c.dir = p
	}
	return e, nil
}

func backendAddr(i int) netip.AddrPort {
	a := backendIP
	for range i {
		a = a.Next()
	}
	return netip.AddrPortFrom(a, backPort)
}

func vipAddr(i int) netip.AddrPort {
	b := vipBase.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(i)
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), vipPort)
}

// serve listens on addr in namespace ns and, for each connection, writes
// its own address (so checks can see which backend answered) and closes.
// Clients that only time the connect reset the connection first; the
// write then fails, which does not matter.
func (e *env) serve(ns string, addr netip.AddrPort) error {
	var ln net.Listener
	err := inNetns(ns, func() (err error) {
		ln, err = net.Listen("tcp4", addr.String())
		return err
	})
	if err != nil {
		return fmt.Errorf("listen on %s in %s: %w", addr, ns, err)
	}
	e.mu.Lock()
	e.listeners = append(e.listeners, ln)
	e.mu.Unlock()
	msg := []byte(addr.String() + "\n")
	e.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				time.Sleep(time.Millisecond) // e.g. EMFILE; bounded retry rate
				continue
			}
			c.Write(msg)
			c.Close()
		}
	})
	return nil
}

// Close kills the clients, closes the listeners and removes the cgroups,
// the namespaces and the temporary directory. It reports every failure
// on stderr and is safe on a partly built env.
func (e *env) Close() {
	for _, c := range e.clients {
		c.kill()
	}
	e.mu.Lock()
	for _, ln := range e.listeners {
		ln.Close()
	}
	e.mu.Unlock()
	e.wg.Wait()
	for _, dir := range []string{e.cgLB, e.cgLB1, e.cgPlain, e.cgParent} {
		if dir == "" {
			continue
		}
		// A killed client leaves its cgroup a moment after it is reaped.
		var err error
		for range 100 {
			if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(os.Stderr, "remove cgroup %s: %v\n", dir, err)
		}
	}
	for _, name := range e.ns {
		if err := cmd("ip", "netns", "del", name); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
	if e.tmp != "" {
		os.RemoveAll(e.tmp)
	}
}

func cmd(args ...string) error {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// inNetns runs f on a thread in namespace ns. Sockets f creates stay in
// ns whichever thread uses them later. The thread is discarded afterwards
// rather than trusted to switch back.
func inNetns(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		fd, err := unix.Open("/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// pinAll restricts every thread of this process to cpu; threads created
// later inherit it from their creator.
func pinAll(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, t := range tasks {
		var tid int
		fmt.Sscan(t.Name(), &tid)
		if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("pin to CPU %d: %w", cpu, err)
		}
	}
	return nil
}
