//go:build kubebench

package kubebench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// Settings, from the environment.
const (
	benchEnv  = "KTEL_BENCH_KUBE"       // 1 runs the benchmark
	sizesEnv  = "KTEL_BENCH_KUBE_SIZES" // Service counts, comma-separated (1,100,10000)
	churnEnv  = "KTEL_BENCH_KUBE_CHURN" // measured endpoint changes per size and proxy (30)
	modesEnv  = "KTEL_BENCH_KUBE_PROXIES"
	outEnv    = "KTEL_BENCH_KUBE_OUT" // a file for the Markdown table
	node      = "bench-node"
	sliceMgr  = "ktel-bench" // endpointslice.kubernetes.io/managed-by: not the controller's
	backendA  = "10.244.0.1:8080"
	backendB  = "10.244.0.2:8080"
	apiPort   = "6443"  // the API server forwarder, inside kube-proxy's namespace
	kpMetrics = "10249" // kube-proxy's metrics, inside its namespace
)

func setting(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// result is one proxy at one size.
type result struct {
	proxy                        string
	services                     int
	initial                      time.Duration // start to every Service programmed
	prog                         []time.Duration
	progFailed                   int
	connect                      connectStats
	rssKiB                       int
	metricProgAvg, metricSyncAvg time.Duration // from the proxy's own metrics
	metricProgN                  int
}

// TestBenchKube runs the benchmark; see the package documentation.
func TestBenchKube(t *testing.T) {
	if os.Getenv(benchEnv) != "1" {
		t.Skipf("a benchmark: set %s=1", benchEnv)
	}
	testenv.Privileged(t)
	kubeBin := kubetest.BinDir(t)
	kubeProxy := filepath.Join(kubeBin, "kube-proxy")
	if _, err := os.Stat(kubeProxy); err != nil {
		t.Fatalf("no kube-proxy (%v): %s", err, kubetest.BuildCommand)
	}
	var sizes []int
	for _, s := range strings.Split(setting(sizesEnv, "1,100,10000"), ",") {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s: %q", sizesEnv, s)
		}
		sizes = append(sizes, n)
	}
	churn, err := strconv.Atoi(setting(churnEnv, "30"))
	if err != nil || churn < 1 {
		t.Fatalf("%s: %v", churnEnv, err)
	}
	proxies := strings.Split(setting(modesEnv, "ktel,iptables,nftables"), ",")
	if slices.Contains(proxies, "ktel") {
		testenv.KtelBinary(t) // built now, not in ktel's start-up time
	}

	c := kubetest.StartWith(t, kubetest.Options{ServiceCIDR: "10.96.0.0/16"})
	c.Node(t, node)
	b := &bench{t: t, c: c, current: map[int]string{}}
	var results []result
	for _, n := range sizes {
		t0 := time.Now()
		b.grow(n)
		t.Logf("%d services with their EndpointSlices in %v", n, time.Since(t0).Round(time.Millisecond))
		for _, p := range proxies {
			var r result
			t.Run(fmt.Sprintf("%s/%d", p, n), func(t *testing.T) {
				r = b.run(t, p, kubeProxy, n, churn)
			})
			r.proxy, r.services = p, n
			results = append(results, r)
			t.Logf("%s", row(r))
		}
	}
	table := "| proxy | Services | initial sync | programming p50 | p99 | max | failed | connect p50 | connect p99 | VmRSS | own metric: programming mean (n) | sync mean |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
	for _, r := range results {
		table += row(r) + "\n"
	}
	t.Logf("results:\n%s", table)
	if out := os.Getenv(outEnv); out != "" {
		if err := os.WriteFile(out, []byte(table), 0o644); err != nil {
			t.Error(err)
		}
	}
}

func row(r result) string {
	d := slices.Clone(r.prog)
	slices.Sort(d)
	var mx time.Duration
	if len(d) > 0 {
		mx = d[len(d)-1]
	}
	ms := func(x time.Duration) string { return fmt.Sprintf("%.1f ms", float64(x)/1e6) }
	us := func(x time.Duration) string { return fmt.Sprintf("%.1f µs", float64(x)/1e3) }
	return fmt.Sprintf("| %s | %d | %s | %s | %s | %s | %d | %s | %s | %.1f MiB | %s (%d) | %s |",
		r.proxy, r.services, r.initial.Round(time.Millisecond), ms(quantile(d, 0.5)), ms(quantile(d, 0.99)), ms(mx), r.progFailed,
		us(r.connect.P50), us(r.connect.P99), float64(r.rssKiB)/1024, ms(r.metricProgAvg), r.metricProgN, ms(r.metricSyncAvg))
}

type bench struct {
	t       *testing.T
	c       *kubetest.Cluster
	n       int            // Services created
	vips    []string       // ClusterIP:80 of each
	current map[int]string // each Service's backend, if not backendA
}

func svcName(i int) string { return fmt.Sprintf("svc-%d", i) }

// slice is Service i's EndpointSlice with one ready endpoint, backend.
func slice(i int, backend string) *discovery.EndpointSlice {
	ip, port, _ := net.SplitHostPort(backend)
	p, _ := strconv.Atoi(port)
	return &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: svcName(i) + "-bench",
			Labels:      map[string]string{discovery.LabelServiceName: svcName(i), discovery.LabelManagedBy: sliceMgr},
			Annotations: map[string]string{corev1.EndpointsLastChangeTriggerTime: time.Now().UTC().Format(time.RFC3339Nano)}},
		AddressType: discovery.AddressTypeIPv4,
		Endpoints: []discovery.Endpoint{{Addresses: []string{ip}, NodeName: ptr.To(node),
			Conditions: discovery.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}}},
		Ports: []discovery.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(p)), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
}

// grow creates Services (no selector) and their slices up to n.
func (b *bench) grow(n int) {
	t := b.t
	ctx := context.Background()
	if n <= b.n {
		return
	}
	vips := make([]string, n)
	copy(vips, b.vips)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	next := b.n
	for range 16 {
		wg.Go(func() {
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= n {
					return
				}
				svc, err := b.c.Client.CoreV1().Services("default").Create(ctx, &corev1.Service{
					ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: svcName(i)},
					Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}},
				}, metav1.CreateOptions{})
				if err == nil {
					_, err = b.c.Client.DiscoveryV1().EndpointSlices("default").Create(ctx, slice(i, backendA), metav1.CreateOptions{})
				}
				if err != nil {
					mu.Lock()
					firstErr = fmt.Errorf("service %d: %w", i, err)
					mu.Unlock()
					return
				}
				vips[i] = svc.Spec.ClusterIP + ":80"
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	b.vips, b.n = vips, n
}

func (b *bench) backend(i int) string {
	if s, ok := b.current[i]; ok {
		return s
	}
	return backendA
}

// flip moves Service i to its other backend.
func (b *bench) flip(ctx context.Context, i int) (string, error) {
	want := backendB
	if b.backend(i) == backendB {
		want = backendA
	}
	_, err := b.c.Client.DiscoveryV1().EndpointSlices("default").Update(ctx, slice(i, want), metav1.UpdateOptions{})
	if err != nil {
		return "", err
	}
	b.current[i] = want
	return want, nil
}

// sandbox is a namespace with both backends (on lo) and a route for the
// ClusterIPs through lo: kube-proxy rewrites them in OUTPUT, after the
// route lookup, which must succeed first. Nothing routes out of it.
func (b *bench) sandbox(t *testing.T, name string) *testenv.Sandbox {
	t.Helper()
	sb := testenv.NewSandbox(t, fmt.Sprintf("ktel-kbench-%s-%d", name, os.Getpid()))
	for _, args := range [][]string{
		{"addr", "add", "10.244.0.1/32", "dev", "lo"},
		{"addr", "add", "10.244.0.2/32", "dev", "lo"},
		{"route", "add", "10.96.0.0/16", "dev", "lo"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", sb.NS}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	for _, addr := range []string{backendA, backendB} {
		sb.ServeAddr(t, addr)
	}
	return sb
}

// forwardAPI listens on 127.0.0.1:apiPort inside ns and forwards every
// connection to the API server on the host's loopback.
func (b *bench) forwardAPI(t *testing.T, ns string) {
	t.Helper()
	ln, err := testenv.InNetns(ns, func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:"+apiPort) })
	if err != nil {
		t.Fatal(err)
	}
	target := strings.TrimPrefix(b.c.Server, "https://")
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	track := func(c net.Conn) { mu.Lock(); conns[c] = true; mu.Unlock() }
	wg.Go(func() {
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			track(client)
			wg.Go(func() {
				defer client.Close()
				server, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				track(server)
				defer server.Close()
				done := make(chan struct{}, 2)
				go func() { io.Copy(server, client); done <- struct{}{} }()
				go func() { io.Copy(client, server); done <- struct{}{} }()
				<-done
			})
		}
	})
}

// proc is a running proxy.
type proc struct {
	pid     int
	metrics func() (string, error) // its /metrics text
}

func (b *bench) startKtel(t *testing.T, sb *testenv.Sandbox) proc {
	k := testenv.StartKtel(t, nil, "KTEL_PROBES=lb", "KTEL_LB_SOURCE=kubernetes", "KUBECONFIG="+b.c.Kubeconfig,
		"KTEL_LB_CGROUP="+sb.Cgroup, "KTEL_NODE_NAME="+node)
	t.Cleanup(func() {
		if !k.Exited() {
			k.Stop(t, syscall.SIGTERM)
		}
	})
	return proc{pid: k.Pid(), metrics: func() (string, error) { return get(http.DefaultClient, "http://"+k.Addr+"/metrics") }}
}

func (b *bench) startKubeProxy(t *testing.T, sb *testenv.Sandbox, bin, mode string) proc {
	t.Helper()
	b.forwardAPI(t, sb.NS)
	dir := t.TempDir()
	kc := b.c.WriteKubeconfig(t, filepath.Join(dir, "kubeconfig"), "https://127.0.0.1:"+apiPort)
	logf, err := os.Create(filepath.Join(dir, "kube-proxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	// ip netns exec execs kube-proxy: the pid is kube-proxy's.
	cmd := exec.Command("ip", "netns", "exec", sb.NS, bin,
		"--kubeconfig="+kc,
		"--proxy-mode="+mode,
		"--hostname-override="+node,
		"--metrics-bind-address=127.0.0.1:"+kpMetrics,
		"--healthz-bind-address=127.0.0.1:10256",
		"--cluster-cidr=10.244.0.0/16",
		// Leave the conntrack sysctls (some are not per namespace) alone.
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"-v="+setting("KTEL_BENCH_KUBE_PROXY_V", "1"),
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	done := make(chan struct{})
	if err := testenv.StartTied(cmd, func(error) { logf.Close(); close(done) }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			data, _ := os.ReadFile(logf.Name())
			t.Logf("kube-proxy log:\n%s", tailLines(string(data), 40))
		}
	})
	// curl inside the namespace: a Go dial from a thread in the namespace
	// was refused now and then, as if made from the host's.
	metrics := func() (string, error) {
		out, err := exec.Command("ip", "netns", "exec", sb.NS, "curl", "-sSf", "-m", "5", "http://127.0.0.1:"+kpMetrics+"/metrics").Output()
		if err != nil {
			return "", fmt.Errorf("curl kube-proxy metrics: %w", err)
		}
		return string(out), nil
	}
	return proc{pid: cmd.Process.Pid, metrics: metrics}
}

func get(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", url, resp.Status)
	}
	return string(body), err
}

// run measures one proxy with n Services.
func (b *bench) run(t *testing.T, proxy, kubeProxy string, n, churn int) result {
	var r result
	sb := b.sandbox(t, proxy)
	var p proc
	var pr *prober
	t0 := time.Now()
	if proxy == "ktel" {
		p = b.startKtel(t, sb)
		t.Logf("ktel serving after %v", time.Since(t0).Round(time.Millisecond))
		pr = startProber(t, sb, true)
	} else {
		p = b.startKubeProxy(t, sb, kubeProxy, proxy)
		pr = startProber(t, sb, false)
	}
	// Programmed: the first and the last Service answer from their
	// backends.
	for _, i := range []int{0, n - 1} {
		if _, err := pr.waitFor(t, b.vips[i], b.backend(i), 2*time.Minute+time.Duration(n)*20*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	r.initial = time.Since(t0)
	t.Logf("%s programmed %d services in %v", proxy, n, r.initial.Round(time.Millisecond))

	// Connect latency over Services at random (up to 64 of them).
	var sample []string
	for range min(n, 64) {
		sample = append(sample, b.vips[rand.IntN(n)])
	}
	pr.connects(t, 200, sample) // warm up
	r.connect = pr.connects(t, 3000, sample)

	// Churn: flip one Service's endpoint at a time and time the API write
	// to the first connect that reaches the new backend. Between two
	// changes, more than the proxies' 1 s minimum sync period passes.
	ctx := context.Background()
	for k := range churn {
		i := rand.IntN(n)
		if n > 1 && k%2 == 1 {
			i = n - 1 - rand.IntN(min(n, 10)) // sometimes the last ones (iptables' chain order)
		}
		start := time.Now()
		want, err := b.flip(ctx, i)
		if err != nil {
			t.Fatal(err)
		}
		at, err := pr.waitFor(t, b.vips[i], want, 60*time.Second)
		if err != nil {
			t.Log(err)
			r.progFailed++
			continue
		}
		r.prog = append(r.prog, at.Sub(start))
		time.Sleep(1100 * time.Millisecond)
	}

	r.rssKiB = rss(t, p.pid)
	// kube-proxy's metrics server sometimes drops a first connection.
	var text string
	var err error
	for range 5 {
		if text, err = p.metrics(); err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Errorf("metrics: %v", err)
	}
	prefix := "kubeproxy_"
	if proxy == "ktel" {
		prefix = "ktel_lb_"
	}
	var cnt int
	r.metricProgAvg, cnt = histMean(text, prefix+"network_programming_duration_seconds")
	r.metricProgN = cnt
	syncName := prefix + "sync_proxy_rules_duration_seconds"
	if proxy == "ktel" {
		syncName = prefix + "sync_duration_seconds"
	}
	r.metricSyncAvg, _ = histMean(text, syncName)
	return r
}

// histMean is a histogram's mean, from its _sum and _count.
func histMean(text, name string) (time.Duration, int) {
	var sum, count float64
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		// Every series (kube-proxy labels some by IP family).
		line := sc.Text()
		sp := strings.LastIndexByte(line, ' ')
		if sp < 0 {
			continue
		}
		series := line[:sp]
		if i := strings.IndexByte(series, '{'); i >= 0 {
			series = series[:i]
		}
		v, _ := strconv.ParseFloat(line[sp+1:], 64)
		switch series {
		case name + "_sum":
			sum += v
		case name + "_count":
			count += v
		}
	}
	if count == 0 {
		return 0, 0
	}
	return time.Duration(sum / count * 1e9), int(count)
}

// rss is a process's VmRSS in KiB.
func rss(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("no VmRSS for %d", pid)
	return 0
}

func tailLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}
