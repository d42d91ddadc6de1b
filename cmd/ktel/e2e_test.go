package main

// End-to-end tests: they build the ktel binary, run it as root, scrape it
// and check that it leaves nothing behind in the kernel. They are
// privileged (see internal/testenv) and must not run in parallel with each
// other: they tell ktel's kernel objects apart from the host's by what
// appeared while ktel ran.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/proto"

	"github.com/ktel-dev/ktel/internal/histogram"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// Bounds on every wait, so that a broken daemon fails the test instead of
// hanging it.
const (
	stopTimeout    = testenv.StopTimeout // from the signal until the process is reaped
	releaseTimeout = 10 * time.Second    // until the kernel has freed what ktel held
	pollInterval   = 25 * time.Millisecond
)

const (
	promtool    = "/usr/bin/promtool"
	textFormat  = "text/plain; version=0.0.4"
	protoFormat = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
	latencyName = "ktel_syscall_latency_seconds"
	countName   = "ktel_syscalls_total"
	// getpidCalls is how many getpid(2) the test makes before scraping;
	// ktel_syscalls_total must have counted at least that many. The
	// default timing times a sample of them.
	getpidCalls = 200
)

func TestMain(m *testing.M) { testenv.Main(m) }

// binary is the ktel binary under test, built once.
func binary(t *testing.T) string {
	t.Helper()
	return testenv.KtelBinary(t)
}

// childEnv is the test's environment without KTEL_* variables, plus kv.
func childEnv(kv ...string) []string { return testenv.ChildEnv(kv...) }

// ktelProc is a running ktel binary.
type ktelProc struct{ *testenv.Ktel }

// startDaemon runs the binary serving on a free loopback port, with env
// added to its environment, and waits until /healthz answers. The process
// is killed at cleanup if the test did not stop it.
func startDaemon(t *testing.T, env ...string) *ktelProc {
	t.Helper()
	return &ktelProc{testenv.StartKtel(t, nil, env...)}
}

// stop sends sig and waits for the process to be reaped.
func (d *ktelProc) stop(t *testing.T, sig syscall.Signal) *os.ProcessState { return d.Stop(t, sig) }

// scrape GETs /metrics with the given Accept header.
func (d *ktelProc) scrape(t *testing.T, accept string) (body []byte, contentType string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+d.Addr+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", accept)
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("scrape: %v\nstderr:\n%s", err, d.Stderr)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("scrape: read body: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: status %s\n%s\nstderr:\n%s", resp.Status, body, d.Stderr)
	}
	return body, resp.Header.Get("Content-Type")
}

// kernelObjects are the BPF programs, maps and links loaded on the host,
// by ID. Programs and maps map to their names (truncated by the kernel to
// 15 bytes), links to the program they attach.
type kernelObjects struct {
	progs map[ebpf.ProgramID]string
	maps  map[ebpf.MapID]string
	links map[link.ID]ebpf.ProgramID
}

// loadedObjects lists every BPF program, map and link on the host. An
// object freed while it is being listed is left out.
func loadedObjects(t *testing.T) kernelObjects {
	t.Helper()
	o, err := listObjects()
	if err != nil {
		t.Fatalf("list BPF objects: %v", err)
	}
	return o
}

func listObjects() (kernelObjects, error) {
	o := kernelObjects{progs: map[ebpf.ProgramID]string{}, maps: map[ebpf.MapID]string{}, links: map[link.ID]ebpf.ProgramID{}}
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			break
		} else if err != nil {
			return o, fmt.Errorf("next program after %d: %w", id, err)
		}
		id = next
		name, err := programName(id)
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return o, err
		}
		o.progs[id] = name
	}
	for id := ebpf.MapID(0); ; {
		next, err := ebpf.MapGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			break
		} else if err != nil {
			return o, fmt.Errorf("next map after %d: %w", id, err)
		}
		id = next
		name, err := mapName(id)
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return o, err
		}
		o.maps[id] = name
	}
	var it link.Iterator
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			it.Link.Close()
			return o, fmt.Errorf("link %d info: %w", it.ID, err)
		}
		o.links[it.ID] = info.Program
	}
	if err := it.Err(); err != nil {
		return o, fmt.Errorf("iterate links: %w", err)
	}
	return o, nil
}

func programName(id ebpf.ProgramID) (string, error) {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return "", fmt.Errorf("program %d: %w", id, err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return "", fmt.Errorf("program %d info: %w", id, err)
	}
	return info.Name, nil
}

func mapName(id ebpf.MapID) (string, error) {
	m, err := ebpf.NewMapFromID(id)
	if err != nil {
		return "", fmt.Errorf("map %d: %w", id, err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		return "", fmt.Errorf("map %d info: %w", id, err)
	}
	return info.Name, nil
}

// added returns what is in b and not in a, but systemd's: it loads cgroup
// programs (sd_devices, sd_fw_ingress, ...) and their maps whenever it
// starts a sandboxed service, which a fresh CI machine may do meanwhile.
func added(a, b kernelObjects) kernelObjects {
	o := kernelObjects{progs: diff(a.progs, b.progs), maps: diff(a.maps, b.maps), links: diff(a.links, b.links)}
	for id, name := range o.progs {
		if strings.HasPrefix(name, "sd_") {
			delete(o.progs, id)
			for l, prog := range o.links {
				if prog == id {
					delete(o.links, l)
				}
			}
		}
	}
	for id, name := range o.maps {
		if strings.HasPrefix(name, "sd_") {
			delete(o.maps, id)
		}
	}
	return o
}

// remaining returns what of ours is still in now.
func remaining(ours, now kernelObjects) kernelObjects {
	return kernelObjects{progs: common(ours.progs, now.progs), maps: common(ours.maps, now.maps), links: common(ours.links, now.links)}
}

func diff[K comparable, V any](a, b map[K]V) map[K]V {
	out := map[K]V{}
	for k, v := range b {
		if _, ok := a[k]; !ok {
			out[k] = v
		}
	}
	return out
}

func common[K comparable, V any](a, b map[K]V) map[K]V {
	out := map[K]V{}
	for k, v := range a {
		if _, ok := b[k]; ok {
			out[k] = v
		}
	}
	return out
}

func (o kernelObjects) empty() bool { return len(o.progs)+len(o.maps)+len(o.links) == 0 }

func (o kernelObjects) String() string {
	return fmt.Sprintf("programs %v, maps %v, links (to program) %v", o.progs, o.maps, o.links)
}

// merge adds b to a.
func (o kernelObjects) merge(b kernelObjects) {
	maps.Copy(o.progs, b.progs)
	maps.Copy(o.maps, b.maps)
	maps.Copy(o.links, b.links)
}

// waitReleased polls until none of ours is loaded any more. The kernel
// frees objects asynchronously after the last reference goes, so a short
// wait is legitimate even after a clean shutdown.
func waitReleased(t *testing.T, ours kernelObjects, stderr fmt.Stringer) {
	t.Helper()
	start := time.Now()
	for n := 0; ; n++ {
		left := remaining(ours, loadedObjects(t))
		if left.empty() {
			t.Logf("kernel released ktel's objects %v after exit", time.Since(start).Round(time.Millisecond))
			return
		}
		if n == 0 {
			t.Logf("loaded when ktel was reaped: %v", left)
		}
		if time.Since(start) > releaseTimeout {
			t.Fatalf("%v after ktel exited, still loaded: %v\nstderr:\n%s", releaseTimeout, left, stderr)
		}
		time.Sleep(pollInterval)
	}
}

// assertSyscallProbe checks that ktel added both syscall programs and links
// attaching them.
func assertSyscallProbe(t *testing.T, ours kernelObjects) {
	t.Helper()
	var enter, exit []ebpf.ProgramID
	for id, name := range ours.progs {
		switch {
		case strings.HasPrefix(name, "sys_enter"):
			enter = append(enter, id)
		case strings.HasPrefix(name, "sys_exit"):
			exit = append(exit, id)
		}
	}
	if len(enter) != 1 || len(exit) != 1 {
		t.Errorf("want one new sys_enter* and one new sys_exit* program, got %v", ours.progs)
	}
	attached := map[ebpf.ProgramID]bool{}
	for _, prog := range ours.links {
		attached[prog] = true
	}
	for _, id := range slices.Concat(enter, exit) {
		if !attached[id] {
			t.Errorf("program %d (%s) is loaded but no new link attaches it; new links: %v", id, ours.progs[id], ours.links)
		}
	}
}

// makeSyscalls makes syscalls the probe must count: getpidCalls getpid(2)
// and a few sleeps.
func makeSyscalls() {
	for range getpidCalls {
		syscall.Getpid()
	}
	for range 5 {
		time.Sleep(time.Millisecond)
	}
}

func TestLifecycle(t *testing.T) {
	testenv.Privileged(t)
	if _, err := os.Stat(promtool); err != nil {
		t.Fatalf("promtool (Debian package prometheus) is needed: %v", err)
	}

	tests := []struct {
		sig syscall.Signal
		// check inspects how the process ended.
		check func(*os.ProcessState) error
	}{
		{syscall.SIGTERM, func(ps *os.ProcessState) error {
			if ps.ExitCode() != 0 {
				return fmt.Errorf("want exit status 0, got %v", ps)
			}
			return nil
		}},
		{syscall.SIGKILL, func(ps *os.ProcessState) error {
			if ws, ok := ps.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				return fmt.Errorf("want death by SIGKILL, got %v", ps)
			}
			return nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.sig.String(), func(t *testing.T) {
			testenv.Privileged(t)
			binary(t) // build before taking the baseline, not while ktel runs

			before := loadedObjects(t)
			d := startDaemon(t)
			ours := added(before, loadedObjects(t))
			assertSyscallProbe(t, ours)

			makeSyscalls()
			t.Run("text", func(t *testing.T) { checkText(t, d) })
			t.Run("protobuf", func(t *testing.T) { checkProtobuf(t, d) })

			// Anything ktel loaded later than the first look counts too.
			ours.merge(added(before, loadedObjects(t)))
			ps := d.stop(t, tt.sig)
			if err := tt.check(ps); err != nil {
				t.Errorf("%v\nstderr:\n%s", err, d.Stderr)
			}
			if tt.sig == syscall.SIGTERM {
				checkLog(t, d.Stderr.String())
			}
			waitReleased(t, ours, d.Stderr)
		})
	}
}

var (
	bucketLine    = regexp.MustCompile(`(?m)^ktel_syscall_latency_seconds_bucket\{syscall="[a-z0-9_]+",le="[^"]+"\} [0-9]+$`)
	textWantLines = []*regexp.Regexp{
		regexp.MustCompile(`(?m)^ktel_probe_up\{probe="syscall"\} 1$`),
		regexp.MustCompile(`(?m)^ktel_build_info\{[^}]*\} 1$`),
		regexp.MustCompile(`(?m)^ktel_scrape_collector_success\{collector="syscall"\} 1$`),
		regexp.MustCompile(`(?m)^ktel_scrape_collector_success\{collector="bpf"\} 1$`),
		regexp.MustCompile(`(?m)^ktel_syscalls_total\{syscall="getpid"\} [0-9]+$`),
	}
)

// checkText scrapes the text format, looks for ktel's series and lints the
// whole exposition with promtool.
func checkText(t *testing.T, d *ktelProc) {
	body, ct := d.scrape(t, textFormat)
	if !strings.HasPrefix(ct, "text/plain") || !strings.Contains(ct, "version=0.0.4") {
		t.Errorf("Content-Type %q, want text format 0.0.4", ct)
	}
	if n := len(bucketLine.FindAll(body, -1)); n == 0 {
		t.Errorf("no line matches %v", bucketLine)
	} else {
		t.Logf("%d classic bucket lines", n)
	}
	for _, re := range textWantLines {
		if !re.Match(body) {
			t.Errorf("no line matches %v", re)
		}
	}

	promtoolCheck(t, body)
	if t.Failed() {
		t.Logf("body:\n%s", body)
	}
}

// promtoolCheck lints a text exposition with promtool check metrics.
func promtoolCheck(t *testing.T, body []byte) {
	t.Helper()
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// checkProtobuf scrapes the protobuf format and checks that every latency
// histogram carries consistent native and classic buckets, that getpid's
// count has the test's calls, and that its histogram, of the timed calls
// only, holds no more than that.
func checkProtobuf(t *testing.T, d *ktelProc) {
	body, ct := d.scrape(t, protoFormat)
	if !strings.HasPrefix(ct, "application/vnd.google.protobuf") || !strings.Contains(ct, "encoding=delimited") {
		t.Fatalf("Content-Type %q, want delimited protobuf", ct)
	}
	families, err := decodeDelimited(body)
	if err != nil {
		t.Fatal(err)
	}
	mf, ok := families[latencyName]
	if !ok {
		t.Fatalf("no family %s in %v", latencyName, slices.Sorted(maps.Keys(families)))
	}
	if got := mf.GetType(); got != dto.MetricType_HISTOGRAM {
		t.Errorf("%s has type %v, want HISTOGRAM", latencyName, got)
	}

	nonEmpty := 0
	var getpid *dto.Histogram
	for _, m := range mf.GetMetric() {
		name := labelValue(m, "syscall")
		h := m.GetHistogram()
		if h == nil {
			t.Errorf("%s{syscall=%q} is not a histogram", latencyName, name)
			continue
		}
		if err := checkHistogram(h); err != nil {
			t.Errorf("%s{syscall=%q}: %v", latencyName, name, err)
		}
		if h.GetSampleCount() > 0 {
			nonEmpty++
		}
		if name == "getpid" {
			getpid = h
		}
	}
	if nonEmpty == 0 {
		t.Errorf("no %s series has observations; %d series", latencyName, len(mf.GetMetric()))
	}
	var calls float64
	for _, m := range families[countName].GetMetric() {
		if labelValue(m, "syscall") == "getpid" {
			calls = m.GetCounter().GetValue()
		}
	}
	if calls < getpidCalls {
		t.Errorf("%s{syscall=\"getpid\"} = %v, want at least the test's %d calls", countName, calls, getpidCalls)
	}
	if getpid != nil && float64(getpid.GetSampleCount()) > calls {
		t.Errorf("getpid timed %d times, more than the %v counted", getpid.GetSampleCount(), calls)
	}
}

// decodeDelimited reads length-delimited MetricFamily messages.
func decodeDelimited(body []byte) (map[string]*dto.MetricFamily, error) {
	out := map[string]*dto.MetricFamily{}
	r := bufio.NewReader(bytes.NewReader(body))
	for {
		mf := &dto.MetricFamily{}
		err := protodelim.UnmarshalFrom(r, mf)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("decode metric family %d: %w", len(out)+1, err)
		}
		if _, dup := out[mf.GetName()]; dup {
			return nil, fmt.Errorf("family %s sent twice", mf.GetName())
		}
		out[mf.GetName()] = mf
	}
}

func labelValue(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// checkHistogram checks one latency histogram: default schema, a zero
// bucket, native buckets that add up to the count, and classic buckets that
// agree with the native ones at every power of two.
func checkHistogram(h *dto.Histogram) error {
	var errs []error
	if got := h.GetSchema(); got != 3 {
		errs = append(errs, fmt.Errorf("schema %d, want the default 3", got))
	}
	if h.GetZeroThreshold() <= 0 {
		errs = append(errs, fmt.Errorf("zero threshold %g, want > 0", h.GetZeroThreshold()))
	}
	if len(h.GetPositiveSpan()) == 0 {
		errs = append(errs, errors.New("no positive span: not a native histogram"))
	}
	if len(h.GetNegativeSpan())+len(h.GetNegativeDelta()) > 0 {
		errs = append(errs, errors.New("negative buckets in a latency histogram"))
	}
	native, err := nativeBuckets(h)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	total := h.GetZeroCount()
	for _, c := range native {
		total += c
	}
	if total != h.GetSampleCount() {
		errs = append(errs, fmt.Errorf("zero count %d + native buckets %d = %d, want sample count %d",
			h.GetZeroCount(), total-h.GetZeroCount(), total, h.GetSampleCount()))
	}

	bounds := histogram.ClassicBounds()
	if len(h.GetBucket()) != 25 || len(bounds) != 25 {
		return errors.Join(append(errs, fmt.Errorf("%d classic buckets (%d bounds), want 25", len(h.GetBucket()), len(bounds)))...)
	}
	for i, b := range h.GetBucket() {
		if b.GetUpperBound() != bounds[i] {
			errs = append(errs, fmt.Errorf("classic bucket %d: upper bound %g, want %g", i, b.GetUpperBound(), bounds[i]))
			continue
		}
		// 2^e is native bucket e * 2^schema's upper bound.
		e := histogram.ClassicMinExp + i
		want := h.GetZeroCount()
		for idx, c := range native {
			if idx <= e<<h.GetSchema() {
				want += c
			}
		}
		if b.GetCumulativeCount() != want {
			errs = append(errs, fmt.Errorf("classic bucket le=%g: count %d, native buckets up to it hold %d", b.GetUpperBound(), b.GetCumulativeCount(), want))
		}
	}
	if last := h.GetBucket()[len(h.GetBucket())-1].GetCumulativeCount(); last > h.GetSampleCount() {
		errs = append(errs, fmt.Errorf("classic bucket le=%g: count %d exceeds sample count %d", bounds[len(bounds)-1], last, h.GetSampleCount()))
	}
	return errors.Join(errs...)
}

// nativeBuckets decodes spans and deltas into counts by bucket index.
func nativeBuckets(h *dto.Histogram) (map[int]uint64, error) {
	out := map[int]uint64{}
	deltas := h.GetPositiveDelta()
	var (
		idx   int
		count int64
		d     int
	)
	for n, s := range h.GetPositiveSpan() {
		if n == 0 {
			idx = int(s.GetOffset())
		} else {
			idx += int(s.GetOffset())
		}
		for range s.GetLength() {
			if d >= len(deltas) {
				return nil, fmt.Errorf("spans cover more buckets than the %d deltas", len(deltas))
			}
			count += deltas[d]
			d++
			if count < 0 {
				return nil, fmt.Errorf("native bucket %d: negative count %d", idx, count)
			}
			out[idx] = uint64(count)
			idx++
		}
	}
	if d != len(deltas) {
		return nil, fmt.Errorf("spans cover %d buckets, %d deltas", d, len(deltas))
	}
	return out, nil
}

// checkLog checks that ktel wrote JSON records, attached the probe, logged
// no error and said it stopped.
func checkLog(t *testing.T, stderr string) {
	t.Helper()
	var attached, stopped bool
	for _, line := range strings.Split(strings.TrimSpace(stderr), "\n") {
		rec, err := parseRecord(line)
		if err != nil {
			t.Errorf("stderr line %q: %v", line, err)
			continue
		}
		if rec.Level == "ERROR" {
			t.Errorf("error logged: %s", line)
		}
		attached = attached || rec.Msg == "probe attached"
		stopped = stopped || rec.Msg == "stopped"
	}
	if !attached || !stopped {
		t.Errorf("want records \"probe attached\" and \"stopped\"; stderr:\n%s", stderr)
	}
}

type record struct{ Level, Msg string }

func parseRecord(line string) (record, error) {
	var r record
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		return r, fmt.Errorf("not a JSON log record: %w", err)
	}
	return r, nil
}

func TestCheck(t *testing.T) {
	testenv.Privileged(t)
	tests := []struct {
		name       string
		env        []string
		wantStatus int
		wantStdout string
		wantStderr string
	}{
		{name: "default", wantStatus: exitOK, wantStdout: "syscall: ok"},
		{name: "unknown probe", env: []string{"KTEL_PROBES=nosuch"}, wantStatus: exitUsage, wantStderr: "KTEL_PROBES"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testenv.Privileged(t)
			bin := binary(t)
			before := loadedObjects(t)

			got, stdout, stderr := testenv.Run(t, []string{bin, "check"}, tt.env...)
			if got != tt.wantStatus {
				t.Errorf("exit status %d, want %d", got, tt.wantStatus)
			}
			if !strings.Contains(stdout, tt.wantStdout) {
				t.Errorf("stdout does not contain %q", tt.wantStdout)
			}
			if !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr does not contain %q", tt.wantStderr)
			}
			if t.Failed() {
				t.Logf("stdout:\n%s\nstderr:\n%s", stdout, stderr)
			}

			// check detaches what it attached: nothing it loaded survives it.
			waitReleased(t, added(before, loadedObjects(t)), stringer(stderr))
		})
	}
}

// TestNativeBucketsDecoder checks the test's own span/delta decoder and
// histogram checks against client_golang's encoder, so that a checkProtobuf failure points
// at ktel and not at the test.
func TestNativeBucketsDecoder(t *testing.T) {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:                        "x_seconds",
		Help:                        "x",
		NativeHistogramBucketFactor: 1.1, // schema 3
		Buckets:                     prometheus.ExponentialBuckets(math.Ldexp(1, histogram.ClassicMinExp), 2, 25),
	})
	for _, v := range []float64{0, 1e-9, 3e-6, 3e-6, 4e-6, 1e-3, 1.5e-3, 0.2, 0.2, 0.2, 7} {
		h.Observe(v)
	}
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	native, err := nativeBuckets(m.GetHistogram())
	if err != nil {
		t.Fatal(err)
	}
	total := m.GetHistogram().GetZeroCount()
	for _, c := range native {
		total += c
	}
	if total != m.GetHistogram().GetSampleCount() {
		t.Errorf("decoded %d observations (%v + zero %d), want %d", total, native, m.GetHistogram().GetZeroCount(), m.GetHistogram().GetSampleCount())
	}
	if err := checkHistogram(m.GetHistogram()); err != nil {
		t.Errorf("checkHistogram rejects client_golang's histogram: %v", err)
	}
	m.Histogram.SampleCount = proto.Uint64(m.GetHistogram().GetSampleCount() + 1)
	if err := checkHistogram(m.GetHistogram()); err == nil {
		t.Error("checkHistogram accepts a sample count that the buckets do not add up to")
	}
	// 0.2 s lies in native bucket ceil(8*log2(0.2)) = -18.
	if native[-18] != 3 {
		t.Errorf("bucket -18 holds %d, want 3; buckets %v", native[-18], native)
	}
}

// stringer shows a fixed string where a fmt.Stringer is wanted.
type stringer string

func (s stringer) String() string { return string(s) }
