//go:build kubebench

package kubebench

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// proberEnv marks the test binary run as a prober (TestHelperProber).
const proberEnv = "KTEL_BENCH_KUBE_PROBER"

// A prober is a helper process inside a proxy's namespace (and, for ktel,
// its cgroup) that connects to ClusterIPs on request, so that every
// connect is made from where the proxy applies.
type prober struct {
	in  io.WriteCloser
	out *bufio.Scanner
}

func startProber(t *testing.T, sb *testenv.Sandbox, inCgroup bool) *prober {
	t.Helper()
	cmd := sb.HelperCommand(t, "TestHelperProber", inCgroup)
	cmd.Env = append(cmd.Env, proberEnv+"=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	p := &prober{in: in, out: bufio.NewScanner(out)}
	if got := p.do(t, "hello"); got != "ready" {
		t.Fatalf("prober: %q", got)
	}
	return p
}

// do sends one request and returns the answer.
func (p *prober) do(t *testing.T, req string) string {
	t.Helper()
	if _, err := fmt.Fprintln(p.in, req); err != nil {
		t.Fatalf("prober: %v", err)
	}
	if !p.out.Scan() {
		t.Fatalf("prober exited: %v", p.out.Err())
	}
	return p.out.Text()
}

// waitFor connects to vip until the answer is want, and returns when
// (wall clock) the first such answer came, or an error after timeout.
func (p *prober) waitFor(t *testing.T, vip, want string, timeout time.Duration) (time.Time, error) {
	t.Helper()
	ans := p.do(t, fmt.Sprintf("wait %s %s %d", vip, want, timeout.Milliseconds()))
	ns, err := strconv.ParseInt(ans, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("%s never answered %s: %s", vip, want, ans)
	}
	return time.Unix(0, ns), nil
}

// connectStats is the duration of connect(2) over n connects to VIPs
// chosen at random.
type connectStats struct {
	N, Failed     int
	P50, P99, Avg time.Duration
}

func (p *prober) connects(t *testing.T, n int, vips []string) connectStats {
	t.Helper()
	ans := p.do(t, fmt.Sprintf("connect %d %s", n, strings.Join(vips, ",")))
	var s connectStats
	var p50, p99, avg int64
	if _, err := fmt.Sscanf(ans, "%d %d %d %d %d", &s.N, &s.Failed, &p50, &p99, &avg); err != nil {
		t.Fatalf("prober: %q: %v", ans, err)
	}
	s.P50, s.P99, s.Avg = time.Duration(p50), time.Duration(p99), time.Duration(avg)
	return s
}

// TestHelperProber is the prober's main loop, in the helper process. It
// reads requests, one a line:
//
//	hello                    -> ready
//	wait VIP WANT TIMEOUTMS  -> unix nanoseconds of the first answer WANT, or "timeout LAST"
//	connect N VIP,VIP,...    -> N FAILED P50NS P99NS AVGNS
func TestHelperProber(t *testing.T) {
	if os.Getenv(proberEnv) != "1" {
		t.Skip("helper process")
	}
	if err := testenv.JoinSandboxCgroup(); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 1 && f[0] == "hello":
			fmt.Println("ready")
		case len(f) == 4 && f[0] == "wait":
			ms, _ := strconv.Atoi(f[3])
			deadline := time.Now().Add(time.Duration(ms) * time.Millisecond)
			last := "none"
			for {
				got, err := testenv.AskAddr(f[1], time.Second)
				if err == nil && got == f[2] {
					fmt.Println(time.Now().UnixNano())
					break
				}
				if err != nil {
					last = strings.ReplaceAll(err.Error(), " ", "_")
				} else {
					last = got
				}
				if time.Now().After(deadline) {
					fmt.Println("timeout", last)
					break
				}
				time.Sleep(time.Millisecond)
			}
		case len(f) == 3 && f[0] == "connect":
			n, _ := strconv.Atoi(f[1])
			vips := strings.Split(f[2], ",")
			var d []time.Duration
			failed := 0
			var sum time.Duration
			for range n {
				c, took, err := connect(vips[rand.IntN(len(vips))])
				if err != nil {
					failed++
					continue
				}
				c.Close()
				d = append(d, took)
				sum += took
			}
			slices.Sort(d)
			if len(d) == 0 {
				fmt.Println(n, failed, 0, 0, 0)
				continue
			}
			fmt.Println(n, failed, int64(quantile(d, 0.5)), int64(quantile(d, 0.99)), int64(sum)/int64(len(d)))
		default:
			fmt.Println("bad request")
		}
	}
	os.Exit(0)
}

// connect dials vip and returns the connection and how long connect took.
func connect(vip string) (net.Conn, time.Duration, error) {
	d := net.Dialer{Timeout: time.Second}
	t0 := time.Now()
	c, err := d.Dial("tcp", vip)
	return c, time.Since(t0), err
}

// quantile of sorted d.
func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(float64(len(d)-1) * q)
	return d[i]
}
