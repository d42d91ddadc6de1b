package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/histogram"
	"github.com/ktel-dev/ktel/metrics"
)

// Accept headers of the two scrape formats Prometheus uses: protobuf
// (native histograms) and text.
const (
	acceptProto = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
	acceptText  = "text/plain;version=0.0.4"
)

// runScrapeBench starts the built daemon with the default probes, then
// with every probe, and measures its footprint idle and under load, and
// /metrics after the load; then /metrics of the same exporter in-process
// over a synthetic 10,000-series source.
func runScrapeBench(w io.Writer, log *slog.Logger, sum *summary, o options) {
	bin, cleanupBin, err := daemonBinary(o.daemon)
	if err != nil {
		fmt.Fprintln(w, "\nscrape: cannot build the daemon:", err)
		return
	}
	defer cleanupBin()

	fmt.Fprintf(w, "\ndaemon footprint and /metrics (%s): idle %s, then %s of load (syscalls of ~20 kinds with and without errors, pipe ping-pong, loopback TCP connects), then scrapes; scrapes are 1.1 s apart so that each reads the maps (ktel shares one read among scrapes within 1 s); steal: the share of both vCPUs' time the hypervisor took over the single scrapes, the 1.1 s between them included (/proc/stat)\n\n", bin, o.idle, o.busy)

	envAll, cleanupAll, err := allProbesEnv()
	if err != nil {
		fmt.Fprintln(w, "all probes: cannot set up netdev/lb isolation:", err)
	}
	defer cleanupAll()

	type run struct {
		name string
		env  []string
	}
	runs := []run{{"default probes (syscall,runqlat,tcpretrans)", nil}}
	if envAll != nil {
		runs = append(runs, run{"all probes (netdev in a private netns, lb on an empty cgroup)", envAll})
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "daemon\tRSS idle MiB\tRSS after load MiB\tpeak RSS MiB\tCPU idle %%\tCPU under load %%\tscrape text ms\tscrape proto ms\t10 parallel ms (median/max)\tCPU ms/scrape\t%% of 15 s\ttext KiB\tproto KiB\tsteal %%\t\n")
	for i, r := range runs {
		f, err := daemonFootprint(bin, r.env, o)
		if err != nil {
			fmt.Fprintf(tw, "%s\t%v\t\t\t\t\t\t\t\t\t\t\t\t\t\n", r.name, err)
			continue
		}
		fmt.Fprintf(tw, "%s\t%.1f\t%.1f\t%.1f\t%.3f\t%.2f\t%.2f [%.2f..%.2f]\t%.2f\t%.2f/%.2f\t%.2f\t%.3f\t%.1f\t%.1f\t%.1f\t\n", r.name,
			f.rssIdle, f.rssLoad, f.rssPeak, f.cpuIdle, f.cpuLoad,
			median(f.text), minOf(f.text), maxOf(f.text), median(f.proto), median(f.parallel), maxOf(f.parallel),
			f.cpuPerScrape, scrapeShare(f.cpuPerScrape), f.textKiB, f.protoKiB, f.steal)
		if i == 0 {
			sum.add("scrape", "CPU per scrape, default probes, as a share of a 15 s interval", []float64{scrapeShare(f.cpuPerScrape)}, "% of a core", "", nil,
				fmt.Sprintf("%.2f ms of CPU per scrape (/proc/PID/stat over %d scrapes, idle CPU subtracted)", f.cpuPerScrape, 2*scrapesPerFormat))
			sum.add("scrape", "/metrics latency, default probes, text", f.text, "ms", "", nil, fmt.Sprintf("%.0f KiB, after %s of load; %.1f %% of the vCPUs' time stolen by the hypervisor over the scrapes", f.textKiB, o.busy, f.steal))
			sum.add("scrape", "/metrics latency, default probes, protobuf", f.proto, "ms", "", nil, fmt.Sprintf("%.0f KiB", f.protoKiB))
			sum.add("scrape", "/metrics latency, default probes, 10 in parallel", f.parallel, "ms", "", nil, "")
			sum.add("footprint", "idle CPU, default probes", []float64{f.cpuIdle}, "% of a core", "<= 0.5%", atMost(0.5), "no scrapes, over "+o.idle.String())
			sum.add("footprint", "RSS, default probes (after load)", []float64{f.rssLoad}, "MiB", "", nil, "")
		} else {
			sum.add("footprint", "RSS, all probes (after load)", []float64{f.rssLoad}, "MiB", "<= 40 MiB", atMost(40), fmt.Sprintf("peak %.1f MiB", f.rssPeak))
			sum.add("footprint", "idle CPU, all probes", []float64{f.cpuIdle}, "% of a core", "<= 0.5%", atMost(0.5), "")
			sum.add("footprint", "CPU under load, all probes", []float64{f.cpuLoad}, "% of a core", "", nil, "user-space side only: BPF time is charged to the traced tasks")
		}
	}
	tw.Flush()

	syntheticScrape(w, log, sum)
}

// daemonBinary returns path if it exists, else builds cmd/ktel into a
// temporary directory.
func daemonBinary(path string) (string, func(), error) {
	if st, err := os.Stat(path); err == nil && !st.IsDir() {
		abs, err := filepath.Abs(path)
		return abs, func() {}, err
	}
	dir, err := os.MkdirTemp("", "ktel-bench-")
	if err != nil {
		return "", nil, err
	}
	bin := filepath.Join(dir, "ktel")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/ktel")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("go build: %w: %s", err, out)
	}
	return bin, func() { os.RemoveAll(dir) }, nil
}

// allProbesEnv is the environment that loads every probe without touching
// anyone else's traffic or processes: netdev watches a network namespace
// of its own (with a veth pair in it), lb balances an empty cgroup.
func allProbesEnv() ([]string, func(), error) {
	ns := fmt.Sprintf("ktel-bench-%d-d", os.Getpid())
	root, err := cgroups.V2Root()
	if err != nil {
		return nil, func() {}, err
	}
	cg := filepath.Join(root, fmt.Sprintf("ktel-bench-%d", os.Getpid()))
	dir, err := os.MkdirTemp("", "ktel-bench-lb-")
	if err != nil {
		return nil, func() {}, err
	}
	cleanup := func() {
		exec.Command("ip", "netns", "del", ns).Run()
		os.Remove(cg)
		os.RemoveAll(dir)
	}
	for _, args := range [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "-n", ns, "link", "add", "ktbench-c", "type", "veth", "peer", "name", "ktbench-d"},
		{"ip", "-n", ns, "link", "set", "ktbench-c", "up"},
		{"ip", "-n", ns, "link", "set", "ktbench-d", "up"},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			cleanup()
			return nil, func() {}, fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
		}
	}
	if err := os.Mkdir(cg, 0o755); err != nil {
		cleanup()
		return nil, func() {}, err
	}
	services := filepath.Join(dir, "services.yaml")
	var b strings.Builder
	b.WriteString("services:\n")
	for i := range 100 {
		fmt.Fprintf(&b, "  - name: svc%d\n    vip: 10.96.%d.%d\n    port: 80\n    protocol: tcp\n    backends:\n", i, i/250, 1+i%250)
		for j := range 4 {
			fmt.Fprintf(&b, "      - {address: 10.1.%d.%d, port: 8080, weight: 1}\n", i, 1+j)
		}
	}
	if err := os.WriteFile(services, []byte(b.String()), 0o644); err != nil {
		cleanup()
		return nil, func() {}, err
	}
	return []string{
		"KTEL_PROBES=syscall,runqlat,tcpretrans,netdev,lb",
		"KTEL_INTERFACES=ktbench-*",
		"KTEL_NETDEV_NETNS=/var/run/netns/" + ns,
		"KTEL_LB_SERVICES_FILE=" + services,
		"KTEL_LB_CGROUP=" + cg,
	}, cleanup, nil
}

type footprint struct {
	rssIdle, rssLoad, rssPeak float64 // MiB
	cpuIdle, cpuLoad          float64 // % of one core
	text, proto, parallel     []float64
	cpuPerScrape              float64 // ms, idle CPU subtracted
	textKiB, protoKiB         float64
	steal                     float64 // % of the vCPUs' time the hypervisor took over the single scrapes, sleeps between them included
}

// scrapesPerFormat is the number of single scrapes of each format, each
// reading the maps: the median of 10 still moved by a millisecond from run
// to run on this machine (about a third of a scrape).
const scrapesPerFormat = 20

// scrapeInterval is Prometheus' usual scrape interval, against which the
// CPU cost of one scrape is weighed.
const scrapeInterval = 15 * time.Second

// scrapeShare is ms of CPU per scrape as a percentage of one core over
// scrapeInterval: what a scrape every 15 s costs.
func scrapeShare(ms float64) float64 { return 100 * ms / float64(scrapeInterval.Milliseconds()) }

// daemonFootprint runs the daemon with extra environment through idle,
// load and scrapes.
func daemonFootprint(bin string, extra []string, o options) (*footprint, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	env := []string{"PATH=" + os.Getenv("PATH"), "KTEL_LISTEN_ADDRESS=" + addr, "KTEL_LOG_LEVEL=warn"}
	env = append(env, extra...)
	cmd := exec.Command(bin)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	pid := cmd.Process.Pid
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}()
	base := "http://" + addr
	if err := waitHealthy(base+"/healthz", 60*time.Second); err != nil {
		return nil, err
	}
	time.Sleep(2 * time.Second) // let start-up settle

	f := &footprint{}
	c0 := cpuNs(pid)
	time.Sleep(o.idle)
	f.cpuIdle = 100 * float64(cpuNs(pid)-c0) / float64(o.idle.Nanoseconds())
	f.rssIdle = rssMiB(pid, "VmRSS")

	c0 = cpuNs(pid)
	t0 := time.Now()
	busyLoad(o.busy, o.cpu)
	f.cpuLoad = 100 * float64(cpuNs(pid)-c0) / float64(time.Since(t0).Nanoseconds())
	f.rssLoad = rssMiB(pid, "VmRSS")

	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	c0, t0 = cpuNs(pid), time.Now()
	s0 := readCPUTimes()
	n := 0
	for i := range 2 * scrapesPerFormat {
		time.Sleep(1100 * time.Millisecond)
		accept := acceptText
		if i%2 == 1 {
			accept = acceptProto
		}
		d, size, err := scrape(client, base+"/metrics", accept)
		if err != nil {
			return nil, err
		}
		n++
		if accept == acceptText {
			f.text, f.textKiB = append(f.text, d), float64(size)/1024
		} else {
			f.proto, f.protoKiB = append(f.proto, d), float64(size)/1024
		}
	}
	// What the daemon spends idle over the same time (its timers) is not
	// the scrapes'.
	idleNs := f.cpuIdle / 100 * float64(time.Since(t0).Nanoseconds())
	f.cpuPerScrape = max(0, float64(cpuNs(pid)-c0)-idleNs) / 1e6 / float64(n)
	f.steal = readCPUTimes().stealSince(s0)
	for range 3 {
		time.Sleep(1100 * time.Millisecond)
		ds, err := parallelScrapes(client, base+"/metrics", acceptProto, 10)
		if err != nil {
			return nil, err
		}
		f.parallel = append(f.parallel, ds...)
	}
	f.rssPeak = rssMiB(pid, "VmHWM")
	return f, nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func waitHealthy(url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if r, err := http.Get(url); err == nil {
			r.Body.Close()
			if r.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not healthy within %s", url, timeout)
}

// scrape returns the time to the last byte in ms and the body size.
func scrape(c *http.Client, url, accept string) (float64, int64, error) {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Accept", accept)
	start := time.Now()
	r, err := c.Do(req)
	if err != nil {
		return 0, 0, err
	}
	n, err := io.Copy(io.Discard, r.Body)
	r.Body.Close()
	d := float64(time.Since(start).Nanoseconds()) / 1e6
	if err != nil {
		return 0, 0, err
	}
	if r.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET %s: %s", url, r.Status)
	}
	return d, n, nil
}

// parallelScrapes starts n scrapes at once and returns each one's latency.
func parallelScrapes(c *http.Client, url, accept string, n int) ([]float64, error) {
	ds := make([]float64, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			ds[i], _, errs[i] = scrape(c, url, accept)
		})
	}
	close(start)
	wg.Wait()
	return ds, errors.Join(errs...)
}

// cpuNs is the CPU time of pid (utime+stime of /proc/PID/stat, all its
// threads), in ns, with the resolution of a clock tick (10 ms): the
// per-thread schedstat run times are zero on this kernel's configuration.
func cpuNs(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return (ut + st) * 1e7 // USER_HZ is 100
}

// cpuTimes are the machine's CPU times of /proc/stat, in clock ticks.
type cpuTimes struct{ total, steal uint64 }

func readCPUTimes() cpuTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal guest guest_nice
	if len(f) < 9 || f[0] != "cpu" {
		return cpuTimes{}
	}
	var t cpuTimes
	for i, v := range f[1:min(len(f), 9)] {
		n, _ := strconv.ParseUint(v, 10, 64)
		t.total += n
		if i == 7 {
			t.steal = n
		}
	}
	return t
}

// stealSince is the share of all vCPUs' time the hypervisor took since
// t0 (%): time they were runnable but not running. NaN if either read
// failed.
func (t cpuTimes) stealSince(t0 cpuTimes) float64 {
	if t0.total == 0 || t.total <= t0.total {
		return math.NaN()
	}
	return 100 * float64(t.steal-t0.steal) / float64(t.total-t0.total)
}

// rssMiB reads a Vm* field of /proc/pid/status.
func rssMiB(pid int, field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

// busyLoad keeps both CPUs busy for d with what the default probes see:
// syscalls of many kinds (some failing), context switches, and loopback
// TCP connections.
func busyLoad(d time.Duration, cpu int) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			pingPong(cpu, 2000)
		}
	})
	wg.Go(func() {
		var u unix.Utsname
		var st unix.Stat_t
		var ts unix.Timespec
		buf := make([]byte, 64)
		for ctx.Err() == nil {
			for range 1000 {
				unix.Getpid()
				unix.Getppid()
				unix.Uname(&u)
				unix.Stat("/nonexistent/ktel-bench", &st) // ENOENT
				unix.Read(-1, buf)                        // EBADF
				if fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
					unix.Read(fd, buf)
					unix.Fstat(fd, &st)
					unix.Close(fd)
				}
				unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
				unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
				unix.Getrandom(buf, 0)
				unix.Kill(1<<22, 0) // ESRCH
				unix.Access("/nonexistent", unix.F_OK)
				unix.Getcwd(buf)
				unix.Getrusage(unix.RUSAGE_SELF, &unix.Rusage{})
			}
		}
	})
	wg.Go(func() {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("x"))
				c.Close()
			}
		}()
		b := make([]byte, 8)
		for ctx.Err() == nil {
			c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second)
			if err != nil {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			c.Read(b)
			c.Close()
		}
	})
	wg.Wait()
}

// fakeSyscalls is a syscall source of nr syscalls, each with a
// histogram over a few dozen slots and errors with errnos errnos: the
// series a host with a large errno spread would export.
type fakeSyscalls struct {
	layout *histogram.Layout
	snap   *sysprobe.Snapshot
}

func newFakeSyscalls(nr, errnos int) *fakeSyscalls {
	layout, _ := histogram.NewLayout(3)
	s := &sysprobe.Snapshot{Latency: map[uint32]sysprobe.Hist{}, Errors: map[sysprobe.ErrorKey]uint64{}}
	for n := range uint32(nr) {
		slots := make([]uint64, layout.Slots())
		for k := 60 + int(n%20); k < 100+int(n%40); k++ {
			slots[k] = uint64(k*1000) + uint64(n)
		}
		s.Latency[n] = sysprobe.Hist{Slots: slots, SumNs: 123456789 * uint64(n+1)}
		for e := range uint32(errnos) {
			s.Errors[sysprobe.ErrorKey{Nr: n, Errno: 1 + e}] = uint64(1000*n + e)
		}
	}
	return &fakeSyscalls{layout: layout, snap: s}
}

func (f *fakeSyscalls) Snapshot() (*sysprobe.Snapshot, error) { return f.snap, nil }
func (f *fakeSyscalls) Layout() *histogram.Layout             { return f.layout }

// syntheticScrape serves the exporter in-process (the daemon's registry
// and handler options) over a fake source of 10,000 series, and scrapes
// it, alone and 10 at a time.
func syntheticScrape(w io.Writer, log *slog.Logger, sum *summary) {
	const nr, errnos = 400, 24 // 400 histograms + 9,600 error counters
	reg, _ := metrics.NewRegistry("bench", "bench", "bench")
	cs := map[string]metrics.Collector{
		"syscall": metrics.NewSyscallCollector(newFakeSyscalls(nr, errnos), sysprobe.NativeName, nil),
	}
	reg.MustRegister(metrics.NewExporter(cs, log))
	srv := httptest.NewServer(metrics.Handler(prometheus.ToTransactionalGatherer(reg), metrics.HandlerOpts{Log: log, Registry: reg, MaxRequestsInFlight: 10}))
	defer srv.Close()
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}

	fmt.Fprintf(w, "\nsynthetic /metrics: the daemon's exporter in-process (metrics.NewExporter and Handler, as the daemon configures them) over a fake syscall source: %d histograms + %d error counters = %d series; 15 scrapes per format, then 5 x 10 in parallel\n\n", nr, nr*errnos, nr+nr*errnos)
	var text, proto, par []float64
	var textKiB, protoKiB float64
	for range 15 {
		d, n, err := scrape(client, srv.URL, acceptText)
		if err != nil {
			fmt.Fprintln(w, "synthetic scrape:", err)
			return
		}
		text, textKiB = append(text, d), float64(n)/1024
		d, n, err = scrape(client, srv.URL, acceptProto)
		if err != nil {
			fmt.Fprintln(w, "synthetic scrape:", err)
			return
		}
		proto, protoKiB = append(proto, d), float64(n)/1024
	}
	for range 5 {
		ds, err := parallelScrapes(client, srv.URL, acceptProto, 10)
		if err != nil {
			fmt.Fprintln(w, "synthetic scrape:", err)
			return
		}
		par = append(par, ds...)
	}
	fmt.Fprintf(w, "text:     %.1f ms [%.1f..%.1f], %.0f KiB\n", median(text), minOf(text), maxOf(text), textKiB)
	fmt.Fprintf(w, "protobuf: %.1f ms [%.1f..%.1f], %.0f KiB\n", median(proto), minOf(proto), maxOf(proto), protoKiB)
	fmt.Fprintf(w, "10 in parallel (protobuf), per scrape: %.1f ms median, %.1f ms max\n", median(par), maxOf(par))
	sum.add("scrape", "/metrics latency, 10,000 synthetic series, text", text, "ms", "", nil, fmt.Sprintf("%.0f KiB", textKiB))
	sum.add("scrape", "/metrics latency, 10,000 synthetic series, protobuf", proto, "ms", "", nil, fmt.Sprintf("%.0f KiB", protoKiB))
	sum.add("scrape", "/metrics latency, 10,000 synthetic series, 10 in parallel", par, "ms", "", nil, "protobuf")
}
