package main

import (
	"bufio"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/bpf/tcpretrans"
)

// runRedisBench measures what users feel: requests per second of
// redis-benchmark (GET and SET over loopback) against a redis-server, the
// server pinned to one CPU and the benchmark to the other, under no probe,
// ktel's default probes, each probe alone, and bpftrace timing syscalls.
func runRedisBench(w io.Writer, log *slog.Logger, sum *summary, o options, bt string) {
	server, bench, err := findRedis()
	if err != nil {
		fmt.Fprintln(w, "\nredis unavailable, application row skipped:", err)
		return
	}
	srvCPU, benchCPU := o.cpu, (o.cpu+1)%runtime.NumCPU()
	fmt.Fprintf(w, "\nredis-benchmark: GET and SET, %d clients, %d requests each per measurement, x %d rounds; redis-server on CPU %d, redis-benchmark on CPU %d, loopback\n\n",
		o.redisClients, o.redisRequests, o.redisRounds, srvCPU, benchCPU)
	srv, err := startRedis(server, srvCPU)
	if err != nil {
		fmt.Fprintln(w, "redis-server:", err)
		return
	}
	defer srv.Close()

	syscallDefault := func() (io.Closer, error) { return sysprobe.Load(sampledSyscallOptions(), log) }
	syscallAll := func() (io.Closer, error) {
		return sysprobe.Load(sysprobe.Options{Schema: 3, Timing: sysprobe.TimeAll}, log)
	}
	runq := func() (io.Closer, error) { return runqlat.Load(runqlat.Options{Schema: 3}, log) }
	retrans := func() (io.Closer, error) { return tcpretrans.Load(tcpretrans.Options{}, log) }
	all := func(setups ...setup) setup {
		return func() (io.Closer, error) {
			var cs closers
			for _, s := range setups {
				c, err := s()
				if err != nil {
					cs.Close()
					return nil, err
				}
				cs = append(cs, c)
			}
			return cs, nil
		}
	}
	sampled := fmt.Sprintf("syscall sample 1/%d", defaultSampleRate())
	cfgs := []config{
		{name: "none"},
		// The least any syscall probe costs: programs that do nothing.
		{name: "empty syscall programs", setup: floorSetup(floorBTF)},
		{name: "default probes", setup: all(syscallDefault, runq, retrans)},
		{name: sampled, setup: syscallDefault},
		{name: "syscall all", setup: syscallAll},
		{name: "runqlat", setup: runq},
		{name: "tcpretrans", setup: retrans},
		{name: "default probes, syscall all", setup: all(syscallAll, runq, retrans)},
	}
	if bt != "" {
		cfgs = append(cfgs, config{name: "bpftrace syscall latency", setup: bpftraceSetup(bt, bpftraceSyscall, srvCPU)})
	}
	var failed error
	run := func() float64 {
		rps, err := redisBenchmark(bench, srv.port, benchCPU, o.redisClients, o.redisRequests)
		if err != nil {
			failed = err
			return math.NaN()
		}
		return rps
	}
	s := measure(cfgs, o.redisRounds, run)
	if failed != nil {
		fmt.Fprintln(w, "redis-benchmark failed at least once:", failed)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "config\tmedian requests/s\tmin..max\tlost vs none, median of rounds\tmin..max\t\n")
	for _, c := range cfgs {
		v := s[c.name]
		if countValid(v) == 0 {
			fmt.Fprintf(tw, "%s\tunavailable\t\t\t\t\n", c.name)
			continue
		}
		lost := lostPct(v, s["none"])
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f..%.0f\t%.1f%%\t%.1f..%.1f\t\n", c.name, median(v), minOf(v), maxOf(v), median(lost), minOf(lost), maxOf(lost))
	}
	tw.Flush()

	sum.add("redis", "requests/s lost, default probes (exact syscall counts, 1 in N timed)", lostPct(s["default probes"], s["none"]), "%", "<= 3%", atMost(3), "")
	sum.add("redis", "requests/s lost, default probes with every syscall timed", lostPct(s["default probes, syscall all"], s["none"]), "%", "", nil, "")
	for _, name := range []string{"empty syscall programs", sampled, "syscall all", "runqlat", "tcpretrans"} {
		sum.add("redis", "requests/s lost, "+name+" alone", lostPct(s[name], s["none"]), "%", "", nil, "")
	}
	if bt != "" {
		sum.add("redis", "requests/s lost, bpftrace syscall latency", lostPct(s["bpftrace syscall latency"], s["none"]), "%", "", nil, "")
	}
}

// lostPct is, round by round, the share of base's requests per second that
// x lost, in percent.
func lostPct(x, base []float64) []float64 {
	out := make([]float64, len(x))
	for i := range x {
		out[i] = 100 * (1 - x[i]/base[i])
	}
	return out
}

// findRedis returns the paths of redis-server and redis-benchmark,
// installing Debian's packages when either is missing.
func findRedis() (server, bench string, err error) {
	look := func() (string, string, error) {
		s, err1 := exec.LookPath("redis-server")
		b, err2 := exec.LookPath("redis-benchmark")
		return s, b, errors.Join(err1, err2)
	}
	if server, bench, err = look(); err == nil {
		return server, bench, nil
	}
	fmt.Fprintln(os.Stderr, "redis missing: apt-get install -y redis-server redis-tools")
	cmd := exec.Command("apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=300", "redis-server", "redis-tools")
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("apt-get install redis-server redis-tools: %w: %s", err, lastLines(string(out), 3))
	}
	return look()
}

type redisServer struct {
	cmd  *exec.Cmd
	port int
}

// startRedis runs redis-server on a free loopback port, pinned to cpu,
// without persistence, and returns once it answers PING.
func startRedis(path string, cpu int) (*redisServer, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cmd := exec.Command("taskset", "-c", strconv.Itoa(cpu), path,
		"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--save", "", "--appendonly", "no",
		"--daemonize", "no", "--protected-mode", "yes", "--logfile", "", "--loglevel", "warning", "--dir", os.TempDir())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	r := &redisServer{cmd: cmd, port: port}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if err := redisPing(port); err == nil {
			return r, nil
		} else if time.Now().After(deadline) {
			r.Close()
			return nil, fmt.Errorf("redis-server does not answer PING within 10 s: %w: %s", err, lastLines(stderr.String(), 3))
		}
	}
}

func redisPing(port int) error {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// Close stops redis-server (SIGTERM, then SIGKILL after 10 s).
func (r *redisServer) Close() error {
	r.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- r.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		r.cmd.Process.Kill()
		return <-done
	}
}

// redisBenchmark runs redis-benchmark's SET and GET tests, pinned to cpu,
// and returns the requests per second over both: all requests over the
// time they took together. Bounded by the request count, and by a
// 2-minute timeout.
func redisBenchmark(path string, port, cpu, clients, requests int) (float64, error) {
	cmd := exec.Command("timeout", "120", "taskset", "-c", strconv.Itoa(cpu), path,
		"-h", "127.0.0.1", "-p", strconv.Itoa(port), "-c", strconv.Itoa(clients), "-n", strconv.Itoa(requests),
		"-t", "set,get", "--csv")
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("redis-benchmark: %w", err)
	}
	recs, err := csv.NewReader(strings.NewReader(string(out))).ReadAll()
	if err != nil {
		return 0, fmt.Errorf("redis-benchmark output: %w", err)
	}
	var secs float64
	n := 0
	for _, r := range recs {
		if len(r) < 2 || (r[0] != "SET" && r[0] != "GET") {
			continue
		}
		rps, err := strconv.ParseFloat(r[1], 64)
		if err != nil || rps <= 0 {
			return 0, fmt.Errorf("redis-benchmark: %q is not a rate", r[1])
		}
		secs += float64(requests) / rps
		n++
	}
	if n != 2 {
		return 0, fmt.Errorf("redis-benchmark: %d of the SET and GET results in %q", n, lastLines(string(out), 3))
	}
	return float64(n*requests) / secs, nil
}
