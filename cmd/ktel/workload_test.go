package main

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/otelcoltest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// The binary with KTEL_NODE_NAME and KUBECONFIG pointing at a real API
// server: a pod's container kept busy, and making a connection whose
// SYN is dropped in a network namespace of the test, shows in the
// run-queue histogram and the retransmit counter under the pod's
// namespace, name (and container, for the histogram); the retransmit's
// span carries the pod's k8s.* attributes.
func TestWorkloadAttribution(t *testing.T) {
	testenv.Privileged(t)
	col := otelcoltest.Start(t)
	c := kubetest.Start(t)
	c.Node(t, "node-a")
	c.Namespace(t, "team-a", nil)
	webID := fmt.Sprintf("%064x", 0xbeef)
	web := c.Pod(t, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web"},
		Spec: corev1.PodSpec{NodeName: "node-a", Containers: []corev1.Container{{Name: "nginx", Image: "registry.example/nginx"}}}})
	c.SetPodStatus(t, "team-a", "web", kubetest.RunningStatus(web, "10.1.0.2", "containerd://"+webID))
	dir := testenv.SubCgroup(t, testenv.TestCgroup(t, "e2e-workload"), testenv.KubepodsPath(string(web.UID), webID))

	ns := fmt.Sprintf("ktel-e2e-wl-%d", time.Now().UnixNano()%1e6)
	sb := testenv.NewSandbox(t, ns)
	for _, cmd := range []string{"iptables", "ip6tables"} {
		testenv.Run(t, []string{"ip", "netns", "exec", sb.NS, cmd, "-w", "5", "-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP"})
	}

	// Per-container syscall latency, bounded to one timed syscall: the
	// shell's sleeps each make one clock_nanosleep.
	d := startDaemon(t, "KTEL_NODE_NAME=node-a", "KUBECONFIG="+c.Kubeconfig, "KTEL_PROBES=syscall,runqlat,tcpretrans",
		"KTEL_WORKLOAD_LABEL_TTL=1m", "KTEL_SYSCALL_PER_CONTAINER=true", "KTEL_SYSCALL_TIMING=list", "KTEL_SYSCALL_LIST=clock_nanosleep",
		"OTEL_EXPORTER_OTLP_ENDPOINT="+col.HTTPEndpoint(), "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf", "KTEL_TCPRETRANS_SPANS=true")

	value := func(body, series string) uint64 {
		re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`)
		m := re.FindStringSubmatch(body)
		if m == nil {
			return 0
		}
		f, _ := strconv.ParseFloat(m[1], 64)
		return uint64(f)
	}
	// Spans are named as their events are read: let the informer know
	// the pod first.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if b, _ := d.scrape(t, "text/plain"); value(string(b), "ktel_workload_pods") == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pod never known\nstderr:\n%s", d.Stderr)
		}
	}

	const sleeps = 300
	spinner := testenv.StartInCgroup(t, dir, "taskset", "-c", "0", "sh", "-c", "while :; do :; done")
	shell := testenv.StartInCgroup(t, dir, "taskset", "-c", "0", "sh", "-c",
		fmt.Sprintf("i=0; while [ $i -lt %d ]; do sleep 0.001; i=$((i+1)); done", sleeps))
	// A connect whose SYN is retransmitted after 1 s, 3 s, 7 s...: cut
	// once ktel shows a retransmit (under emulation, bash alone may take
	// longer to start than a fixed 1.5 s allowed), within the bounds of
	// the wait below. timeout passes its SIGTERM on to bash.
	syn := testenv.StartInCgroup(t, dir, "ip", "netns", "exec", sb.NS, "timeout", "40", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7")
	synDone := make(chan error, 1)
	go func() { synDone <- syn.Wait() }()
	cut := sync.OnceFunc(func() {
		syn.Process.Signal(syscall.SIGTERM)
		<-synDone
	})
	t.Cleanup(cut)
	if err := shell.Wait(); err != nil {
		t.Fatal(err)
	}
	spinner.Process.Kill()
	spinner.Wait()

	waits := `ktel_runqueue_latency_seconds_count{container="nginx",namespace="team-a",pod="web",unit=""}`
	rtx := `ktel_tcp_retransmits_total{family="ipv4",kind="syn",namespace="team-a",pod="web",state="SYN_SENT",unit=""}`
	naps := `ktel_syscall_latency_seconds_count{container="nginx",namespace="team-a",pod="web",syscall="clock_nanosleep",unit=""}`
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-synDone:
			synDone <- err
			if err == nil {
				t.Fatal("connected through a firewall")
			}
		default:
		}
		b, _ := d.scrape(t, "text/plain")
		body := string(b)
		w, r, n := value(body, waits), value(body, rtx), value(body, naps)
		if w >= sleeps && r >= 1 && n >= sleeps {
			if value(body, "ktel_workload_pods") != 1 {
				t.Errorf("ktel_workload_pods is not 1:\n%s", body)
			}
			if strings.Contains(body, `ktel_syscall_latency_seconds_count{container="nginx",namespace="team-a",pod="web",syscall="read"`) {
				t.Error("an unlisted syscall is timed per container")
			}
			promtoolCheck(t, b)
			t.Logf("pod web: %d waits, %d SYN retransmits, %d clock_nanosleep", w, r, n)
			cut()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod web: %d waits (want >= %d), %d SYN retransmits (want >= 1), %d clock_nanosleep (want >= %d)\n%s\nstderr:\n%s",
				w, sleeps, r, n, sleeps, body, d.Stderr)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// The retransmit's span names the pod (OpenTelemetry's k8s.*).
	wantAttrs := map[string]any{"k8s.namespace.name": "team-a", "k8s.pod.name": "web", "k8s.container.name": "nginx"}
	podSpan := func(sp otelcoltest.Span) bool {
		if sp.Name != "tcp retransmit" || sp.Attributes["network.peer.address"] != "127.0.0.1" {
			return false
		}
		for k, v := range wantAttrs {
			if sp.Attributes[k] != v {
				return false
			}
		}
		return true
	}
	col.WaitForSpans(t, 15*time.Second, func(s []otelcoltest.Span) bool { return slices.ContainsFunc(s, podSpan) })
}
