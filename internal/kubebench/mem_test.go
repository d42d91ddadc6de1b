//go:build kubebench

package kubebench

import (
	"context"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// TestKtelMemory follows ktel's memory over its first
// KTEL_BENCH_KUBE_MEM_SECONDS (default 60) against KTEL_BENCH_KUBE_MEM
// Services: VmRSS (anonymous and file-backed) once a
// second, with an endpoint change every 2 s, and the Go heap from its own
// metrics every KTEL_BENCH_KUBE_MEM_SCRAPE seconds (default 0: only at
// the end; a scrape of 10,000 services' metrics allocates enough to move
// the heap), for each ktel binary in KTEL_BENCH_KUBE_MEM_BINARIES
// (comma-separated; default: this tree's) against the same control
// plane, so that builds can be compared. A measurement for
// BENCHMARKS-lb.md, not a check.
func TestKtelMemory(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("KTEL_BENCH_KUBE_MEM"))
	if n < 1 {
		t.Skip("a measurement: set KTEL_BENCH_KUBE_MEM to a number of Services")
	}
	testenv.Privileged(t)
	scrape, _ := strconv.Atoi(os.Getenv("KTEL_BENCH_KUBE_MEM_SCRAPE"))
	secs, _ := strconv.Atoi(os.Getenv("KTEL_BENCH_KUBE_MEM_SECONDS"))
	if secs < 1 {
		secs = 60
	}
	bins := strings.Split(os.Getenv("KTEL_BENCH_KUBE_MEM_BINARIES"), ",")
	if bins[0] == "" {
		bins = []string{testenv.KtelBinary(t)}
	}
	c := kubetest.StartWith(t, kubetest.Options{ServiceCIDR: "10.96.0.0/16"})
	c.Node(t, node)
	b := &bench{t: t, c: c, current: map[int]string{}}
	t0 := time.Now()
	b.grow(n)
	t.Logf("%d services with their EndpointSlices in %v", n, time.Since(t0).Round(time.Millisecond))
	heap := regexp.MustCompile(`(?m)^go_memstats_(heap_inuse|next_gc|heap_released)_bytes ([0-9.e+]+)$`)
	for _, bin := range bins {
		t.Run(bin, func(t *testing.T) {
			sb := b.sandbox(t, "mem")
			k := testenv.StartKtel(t, []string{bin}, "KTEL_PROBES=lb", "KTEL_LB_SOURCE=kubernetes", "KUBECONFIG="+b.c.Kubeconfig,
				"KTEL_LB_CGROUP="+sb.Cgroup, "KTEL_NODE_NAME="+node)
			defer k.Stop(t, syscall.SIGTERM)
			for s := range secs {
				if s%2 == 1 {
					if _, err := b.flip(context.Background(), s%n); err != nil {
						t.Fatal(err)
					}
				}
				time.Sleep(time.Second)
				status, _ := os.ReadFile("/proc/" + strconv.Itoa(k.Pid()) + "/status")
				var mem []string
				for _, l := range strings.Split(string(status), "\n") {
					if f := strings.Fields(l); len(f) >= 2 && (f[0] == "VmRSS:" || f[0] == "RssAnon:" || f[0] == "RssFile:" || f[0] == "VmHWM:") {
						v, _ := strconv.Atoi(f[1])
						mem = append(mem, f[0]+strconv.FormatFloat(float64(v)/1024, 'f', 1, 64))
					}
				}
				if (scrape == 0 || (s+1)%scrape != 0) && s != secs-1 {
					t.Logf("%2ds %s", s+1, strings.Join(mem, " "))
					continue
				}
				text, _ := get(http.DefaultClient, "http://"+k.Addr+"/metrics")
				for _, m := range heap.FindAllStringSubmatch(text, -1) {
					v, _ := strconv.ParseFloat(m[2], 64)
					mem = append(mem, m[1]+":"+strconv.FormatFloat(v/(1<<20), 'f', 1, 64))
				}
				t.Logf("%2ds %s", s+1, strings.Join(mem, " "))
			}
		})
	}
}
