package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A client is a re-exec of this binary under `ip netns exec`, in one
// namespace and one child cgroup, pinned to the client CPU. It reads
// requests (one JSON line each) on stdin and answers each with one JSON
// line: the duration of every connect+close, or which backend answered.
const (
	clientEnv     = "KTEL_BENCH_LB_CLIENT"
	clientCPUEnv  = "KTEL_BENCH_LB_CPU"
	clientLifeEnv = "KTEL_BENCH_LB_MAX_SECONDS"
	clientCgEnv   = "KTEL_BENCH_LB_CGROUP_FD"
)

type request struct {
	Addr      string `json:"addr"`
	N         int    `json:"n"`      // measured connects
	Warmup    int    `json:"warmup"` // connects before, not reported
	Read      bool   `json:"read"`   // read which backend answered instead of timing
	TimeoutMS int    `json:"timeout_ms"`
}

type response struct {
	LatNS    []int64        `json:"lat_ns,omitempty"`
	Errors   map[string]int `json:"errors,omitempty"`
	Backends map[string]int `json:"backends,omitempty"`
}

type client struct {
	name  string
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
}

func (e *env) startClient(name, role, cgroup string, cpu int, life time.Duration) (*client, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	// `ip netns exec` mounts a fresh /sys, hiding the cgroup file system:
	// the client gets cgroup.procs as file descriptor 3 and joins before
	// it opens any socket.
	procs, err := os.OpenFile(filepath.Join(cgroup, "cgroup.procs"), os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	defer procs.Close()
	c := exec.Command("ip", "netns", "exec", e.ns[role], self)
	c.Env = append(os.Environ(),
		clientEnv+"="+name,
		clientCPUEnv+"="+strconv.Itoa(cpu),
		clientLifeEnv+"="+strconv.Itoa(int(life.Seconds())),
		clientCgEnv+"=3",
		// No preemption signals: each connect(2) runs once, never
		// interrupted (EINTR) and retried.
		"GODEBUG=asyncpreemptoff=1",
	)
	c.ExtraFiles = []*os.File{procs}
	c.Stderr = os.Stderr
	in, err := c.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := c.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := c.Start(); err != nil {
		return nil, err
	}
	cl := &client{name: name, cmd: c, in: in, lines: make(chan string, 1)}
	e.clients = append(e.clients, cl)
	go func() {
		defer close(cl.lines)
		r := bufio.NewReaderSize(out, 1<<20)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			cl.lines <- line
		}
	}()
	return cl, nil
}

// do sends one request and waits for its answer, at most its timeout
// plus a margin; a client that does not answer in time is killed.
func (c *client) do(ctx context.Context, req request) (response, error) {
	var resp response
	b, _ := json.Marshal(req)
	if _, err := c.in.Write(append(b, '\n')); err != nil {
		return resp, fmt.Errorf("client %s: %w", c.name, err)
	}
	t := time.NewTimer(time.Duration(req.TimeoutMS)*time.Millisecond + 5*time.Second)
	defer t.Stop()
	select {
	case line, ok := <-c.lines:
		if !ok {
			return resp, fmt.Errorf("client %s exited", c.name)
		}
		if err := json.Unmarshal([]byte(line), &resp); err != nil {
			return resp, fmt.Errorf("client %s: %w: %q", c.name, err, line)
		}
		return resp, nil
	case <-t.C:
		c.kill()
		return resp, fmt.Errorf("client %s: no answer in time; killed", c.name)
	case <-ctx.Done():
		c.kill()
		return resp, ctx.Err()
	}
}

func (c *client) kill() {
	if c.cmd.ProcessState == nil {
		c.in.Close()
		c.cmd.Process.Kill()
		c.cmd.Wait()
	}
}

// clientMain is the client process.
func clientMain() int {
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "client %s: %v\n", os.Getenv(clientEnv), err)
		return 3
	}
	if os.Getenv(clientCgEnv) == "3" {
		// "0" moves the writing process, all its threads.
		if _, err := os.NewFile(3, "cgroup.procs").Write([]byte("0")); err != nil {
			return fail(fmt.Errorf("join cgroup: %w", err))
		}
	}
	cpu, _ := strconv.Atoi(os.Getenv(clientCPUEnv))
	if err := pinAll(cpu); err != nil {
		return fail(err)
	}
	runtime.LockOSThread()
	life, _ := strconv.Atoi(os.Getenv(clientLifeEnv))
	deadline := time.Now().Add(time.Duration(life) * time.Second)

	sc := bufio.NewScanner(os.Stdin)
	w := bufio.NewWriterSize(os.Stdout, 1<<20)
	enc := json.NewEncoder(w)
	for sc.Scan() {
		if time.Now().After(deadline) {
			return fail(errors.New("lifetime exceeded"))
		}
		var req request
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			return fail(err)
		}
		resp, err := serveRequest(req, deadline)
		if err != nil {
			return fail(err)
		}
		enc.Encode(resp)
		w.Flush()
	}
	return 0
}

func serveRequest(req request, life time.Time) (response, error) {
	ap, err := netip.ParseAddrPort(req.Addr)
	if err != nil || !ap.Addr().Is4() {
		return response{}, fmt.Errorf("address %q: want IPv4:port", req.Addr)
	}
	sa := &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	deadline := time.Now().Add(time.Duration(req.TimeoutMS) * time.Millisecond)
	if life.Before(deadline) {
		deadline = life
	}
	resp := response{Errors: map[string]int{}}
	if req.Read {
		resp.Backends = map[string]int{}
	} else {
		resp.LatNS = make([]int64, 0, req.N)
	}
	for i := 0; i < req.Warmup+req.N && time.Now().Before(deadline); i++ {
		d, backend, err := connectOnce(sa, req.Read)
		switch {
		case i < req.Warmup:
		case err != nil:
			resp.Errors[errnoName(err)]++
		case req.Read:
			resp.Backends[backend]++
		default:
			resp.LatNS = append(resp.LatNS, d.Nanoseconds())
		}
	}
	return resp, nil
}

// connectOnce times one blocking connect(2) and close(2) of a fresh
// socket (not its creation), with plain syscalls so that each is exactly
// one system call. SO_LINGER 0 makes close reset the connection: no
// TIME_WAIT sockets pile up over the run, which would make the search for
// a free local port, and so the timings, drift. SO_SNDTIMEO bounds a
// connect whose SYN is lost. With read, it reads the backend's answer
// instead and does not time anything.
func connectOnce(sa *unix.SockaddrInet4, read bool) (time.Duration, string, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, "", err
	}
	tv := unix.Timeval{Sec: 2}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	start := time.Now()
	err = unix.Connect(fd, sa)
	if err != nil || !read {
		unix.Close(fd)
		return time.Since(start), "", err
	}
	defer unix.Close(fd)
	var buf []byte
	tmp := make([]byte, 64)
	for len(buf) < 64 && !strings.Contains(string(buf), "\n") {
		n, err := unix.Read(fd, tmp)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, "", err
		}
		if n == 0 {
			break
		}
		buf = append(buf, tmp[:n]...)
	}
	return 0, strings.TrimSpace(string(buf)), nil
}

func errnoName(err error) string {
	var e unix.Errno
	if errors.As(err, &e) {
		if name := unix.ErrnoName(e); name != "" {
			return name
		}
		return strconv.Itoa(int(e))
	}
	return err.Error()
}
