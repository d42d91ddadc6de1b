// Package otelcoltest runs a real OpenTelemetry Collector for tests: OTLP in
// on loopback ports (gRPC and HTTP), every trace batch written by the file
// exporter as OTLP JSON, which Spans reads back. The collector is the one
// hack/otelcol/build.sh builds (make otelcol); Restart brings it back on the
// same ports, for tests of what ktel does while its collector is away.
package otelcoltest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// BinaryEnv names a collector binary to use instead of the one in the
// repository's .cache.
const BinaryEnv = "KTEL_OTELCOL"

// BuildCommand builds the collector that Start looks for.
const BuildCommand = "make otelcol (or: bash hack/otelcol/build.sh)"

const (
	// How long the collector may take to accept connections: its start is
	// well under a second, but CI machines are small and busy.
	startTimeout = 30 * time.Second
	// How long it may take to shut down on SIGTERM (it flushes the file)
	// before it is killed.
	stopTimeout = 10 * time.Second
	// How often the file exporter flushes its buffer: bounds how long a
	// received span takes to show in Spans.
	flushInterval = "50ms"
)

// Collector is a running collector, stopped when the test ends.
type Collector struct {
	tb       testing.TB
	bin      string
	dir      string
	config   string
	output   string
	logPath  string
	grpcAddr string
	httpAddr string

	mu   sync.Mutex
	proc *process // nil while stopped
}

// Start starts a collector for tb and stops it when tb ends. It skips tb if
// the collector binary is missing, unless privileged tests are enabled
// (testenv.Enabled: CI and make test), where that is a failure.
func Start(tb testing.TB) *Collector {
	tb.Helper()
	bin, err := binary()
	if err != nil {
		if testenv.Enabled() {
			tb.Fatalf("otelcoltest: %v; build it with: %s", err, BuildCommand)
		}
		tb.Skipf("otelcoltest: %v; build it with: %s", err, BuildCommand)
	}

	dir := tb.TempDir()
	c := &Collector{
		tb:      tb,
		bin:     bin,
		dir:     dir,
		config:  filepath.Join(dir, "config.yaml"),
		output:  filepath.Join(dir, "traces.jsonl"),
		logPath: filepath.Join(dir, "collector.log"),
	}
	ports, err := freePorts(2)
	if err != nil {
		tb.Fatalf("otelcoltest: %v", err)
	}
	c.grpcAddr = fmt.Sprintf("127.0.0.1:%d", ports[0])
	c.httpAddr = fmt.Sprintf("127.0.0.1:%d", ports[1])
	if err := os.WriteFile(c.config, c.configYAML(), 0o600); err != nil {
		tb.Fatalf("otelcoltest: %v", err)
	}

	tb.Cleanup(func() {
		c.Stop()
		if tb.Failed() {
			tb.Logf("otelcoltest: collector log (%s):\n%s", c.logPath, c.logTail())
		}
	})
	if err := c.start(); err != nil {
		tb.Fatalf("otelcoltest: %v\ncollector log:\n%s", err, c.logTail())
	}
	return c
}

// GRPCEndpoint is the OTLP/gRPC receiver's address, host:port.
func (c *Collector) GRPCEndpoint() string { return c.grpcAddr }

// HTTPEndpoint is the OTLP/HTTP receiver's base URL, http://host:port
// (traces go to /v1/traces).
func (c *Collector) HTTPEndpoint() string { return "http://" + c.httpAddr }

// OutputPath is the file the collector writes traces to, one OTLP JSON
// ExportTraceServiceRequest a line. It survives Restart.
func (c *Collector) OutputPath() string { return c.output }

// Stop stops the collector: SIGTERM, then SIGKILL if it has not exited
// after a while. It reports on tb a collector that exited by itself before,
// or had to be killed. Stopping a stopped collector does nothing.
func (c *Collector) Stop() {
	c.mu.Lock()
	p := c.proc
	c.proc = nil
	c.mu.Unlock()
	if p == nil {
		return
	}
	select {
	case <-p.done:
		c.tb.Errorf("otelcoltest: collector exited before Stop: %v\ncollector log:\n%s", p.err, c.logTail())
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			c.tb.Errorf("otelcoltest: collector exited on SIGTERM with %v", p.err)
		}
	case <-time.After(stopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		c.tb.Errorf("otelcoltest: collector did not exit within %v of SIGTERM; killed", stopTimeout)
	}
}

// Restart stops the collector and starts it again with the same ports and
// output file (which it appends to, so earlier spans stay). Call it from the
// test's goroutine: it fails the test if the collector does not come back.
func (c *Collector) Restart() {
	c.tb.Helper()
	c.Stop()
	if err := c.start(); err != nil {
		c.tb.Fatalf("otelcoltest: restart: %v\ncollector log:\n%s", err, c.logTail())
	}
}

// Spans returns every span the collector has written so far, in the order
// written. A line still being written is left for the next call.
func (c *Collector) Spans() ([]Span, error) {
	b, err := os.ReadFile(c.output)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read collector output: %w", err)
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	return ParseSpans(b)
}

// WaitForSpans polls Spans until done returns true for the spans written so
// far, and returns them. It fails tb, listing what it saw, after timeout.
func (c *Collector) WaitForSpans(tb testing.TB, timeout time.Duration, done func([]Span) bool) []Span {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		spans, err := c.Spans()
		if err == nil && done(spans) {
			return spans
		}
		if time.Now().After(deadline) {
			names := make([]string, len(spans))
			for i, s := range spans {
				names[i] = s.Name
			}
			tb.Fatalf("otelcoltest: spans not as expected after %v (last error: %v); %d spans: %s",
				timeout, err, len(spans), strings.Join(names, ", "))
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// configYAML is the collector's configuration (JSON, which is YAML): OTLP in
// on loopback, traces to the file (appending, so that Restart keeps them) and
// to the debug exporter's log, and no telemetry listener of its own.
func (c *Collector) configYAML() []byte {
	type m = map[string]any
	cfg := m{
		"receivers": m{"otlp": m{"protocols": m{
			"grpc": m{"endpoint": c.grpcAddr},
			"http": m{"endpoint": c.httpAddr},
		}}},
		"exporters": m{
			"file": m{
				"path":           c.output,
				"format":         "json",
				"append":         true,
				"flush_interval": flushInterval,
			},
			"debug": m{"verbosity": "basic"},
		},
		"service": m{
			"telemetry": m{
				"metrics": m{"level": "none"},
				"logs":    m{"level": "info", "encoding": "console"},
			},
			"pipelines": m{"traces": m{
				"receivers": []string{"otlp"},
				"exporters": []string{"file", "debug"},
			}},
		},
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		panic(err) // only maps, strings and bools
	}
	return b
}

// start runs the collector and waits until both receivers accept
// connections; the collector starts its receivers last, so by then the
// pipeline is ready.
func (c *Collector) start() error {
	log, err := os.OpenFile(c.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close() // the child has its own descriptor
	p, err := spawn(c.bin, []string{"--config=file:" + c.config}, log)
	if err != nil {
		return fmt.Errorf("start %s: %w", c.bin, err)
	}
	c.mu.Lock()
	c.proc = p
	c.mu.Unlock()

	deadline := time.Now().Add(startTimeout)
	for _, addr := range []string{c.grpcAddr, c.httpAddr} {
		for {
			conn, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				conn.Close()
				break
			}
			select {
			case <-p.done:
				c.mu.Lock()
				c.proc = nil
				c.mu.Unlock()
				return fmt.Errorf("collector exited while starting: %v", p.err)
			default:
			}
			if time.Now().After(deadline) {
				c.Stop()
				return fmt.Errorf("collector did not accept connections on %s within %v", addr, startTimeout)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

func (c *Collector) logTail() string {
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	const limit = 8 << 10
	if len(b) > limit {
		b = append([]byte("...\n"), b[len(b)-limit:]...)
	}
	return string(b)
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited; err is then set
	err  error
}

// spawn starts bin with Pdeathsig, so that the collector dies with the test
// binary even when Cleanup never runs (a panic, go test's timeout). Pdeathsig
// fires when the thread that forked exits, not the process, so the fork
// happens on a thread locked to a goroutine that lives until the child exits.
func spawn(bin string, args []string, out *os.File) (*process, error) {
	p := &process{done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = out, out
	if err := testenv.StartTied(p.cmd, func(err error) {
		p.err = err
		close(p.done)
	}); err != nil {
		return nil, err
	}
	return p, nil
}

// binary finds the collector: $KTEL_OTELCOL, else .cache/otelcol/otelcol-ktel
// in the repository holding the working directory.
func binary() (string, error) {
	if bin := os.Getenv(BinaryEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("%s: %w", BinaryEnv, err)
		}
		return bin, nil
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(root, ".cache", "otelcol", "otelcol-ktel")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("no collector binary (%w)", err)
	}
	return bin, nil
}

// repoRoot walks up from the working directory (a package's directory under
// go test) to the directory holding go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory; set " + BinaryEnv)
		}
		dir = parent
	}
}

// freePorts returns n distinct loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		defer l.Close() // held until all are chosen, so they differ
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
