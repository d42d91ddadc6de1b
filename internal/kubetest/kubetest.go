// Package kubetest runs a real Kubernetes control plane for tests: etcd,
// kube-apiserver and kube-controller-manager, on 127.0.0.1 only, on free
// ports, with their state in the test's temporary directory, torn down
// when the test ends (Start), or shared by a package's tests and torn
// down after them (Shared, with Main as TestMain). There is no kubelet: tests create Nodes and Pods and
// set pod status themselves (SetPodStatus). The binaries are the ones
// hack/kube/build.sh builds (make kube).
package kubetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// BinDirEnv names a directory holding the binaries, instead of the
// repository's .cache/kube/bin.
const BinDirEnv = "KTEL_KUBE_BIN"

// BuildCommand builds the binaries Start needs.
const BuildCommand = "make kube (or: bash hack/kube/build.sh)"

// Binaries Start runs, and kubectl for tests that apply manifests.
var Binaries = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kubectl"}

const (
	// Start-up takes 1 s (etcd), 3-4 s (apiserver) and 1-2 s
	// (controller-manager) on an idle machine; CI machines are small and
	// busy, and under emulation (make test-kernel) it took 3 s, 86 s and
	// 18 s, and more than 2 minutes once.
	startTimeout = 5 * time.Minute
	stopTimeout  = 15 * time.Second
	// kube-apiserver stops listening at once on SIGTERM, but waits for
	// its watches to end for longer than 15 s: a restart does not wait
	// that long.
	restartStopTimeout = 3 * time.Second
	// nodeMonitorGracePeriod is how long the controller-manager waits for
	// a Node's heartbeat before marking it NotReady.
	nodeMonitorGracePeriod = 24 * time.Hour
)

// Cluster is a running control plane.
type Cluster struct {
	// Dir holds the state and logs of every process.
	Dir string
	// Kubeconfig is a kubeconfig file for the cluster's administrator
	// (group system:masters), for kubectl and KUBECONFIG.
	Kubeconfig string
	// Server is the API server's URL.
	Server string
	// Config and Client are the administrator's.
	Config *rest.Config
	Client kubernetes.Interface
	// StartTimes are how long each component took to become ready.
	StartTimes map[string]time.Duration

	bin     string
	token   string
	caPEM   []byte
	etcdURL string
	// apiserver is the running kube-apiserver and apiArgs its arguments,
	// for RestartAPIServer.
	apiserver *proc
	apiArgs   []string
}

// BinDir returns the directory of the control-plane binaries. When one is
// missing, it skips tb, unless privileged tests are enabled
// (testenv.Enabled), where it fails tb naming the build command.
func BinDir(tb testing.TB) string {
	tb.Helper()
	dir := os.Getenv(BinDirEnv)
	if dir == "" {
		root, err := repoRoot()
		if err != nil {
			tb.Fatalf("kubetest: %v", err)
		}
		dir = filepath.Join(root, ".cache", "kube", "bin")
	}
	for _, b := range Binaries {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			msg := fmt.Sprintf("kubetest: no %s (%v); build the control plane with: %s", b, err, BuildCommand)
			if testenv.Enabled() {
				tb.Fatal(msg)
			}
			tb.Skip(msg)
		}
	}
	return dir
}

// Gate skips tb unless privileged (heavy) tests are enabled; once they
// are, it never skips.
func Gate(tb testing.TB) {
	tb.Helper()
	if !testenv.Enabled() {
		tb.Skipf("starts a Kubernetes control plane: set %s=1", testenv.PrivilegedEnv)
	}
}

// Start starts etcd, kube-apiserver and kube-controller-manager and waits
// until the API server is ready and the controller-manager has created
// the default service account. Everything is stopped, and its state
// removed, when tb ends.
func Start(tb testing.TB) *Cluster {
	tb.Helper()
	return StartWith(tb, Options{})
}

// Options change what StartWith starts.
type Options struct {
	// ServiceCIDR is the range ClusterIPs are allocated from; empty is
	// DefaultServiceCIDR. A benchmark with thousands of Services needs a
	// wider one.
	ServiceCIDR string
}

// DefaultServiceCIDR is the ClusterIP range of Start.
const DefaultServiceCIDR = "10.0.0.0/24"

// StartWith is Start with options.
func StartWith(tb testing.TB, opts Options) *Cluster {
	tb.Helper()
	if opts.ServiceCIDR == "" {
		opts.ServiceCIDR = DefaultServiceCIDR
	}
	Gate(tb)
	c := &Cluster{Dir: tb.TempDir(), bin: BinDir(tb), StartTimes: map[string]time.Duration{}}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()

	// etcd.
	t0 := time.Now()
	etcdClient, etcdPeer := freePort(tb), freePort(tb)
	etcdURL := "http://127.0.0.1:" + etcdClient
	peerURL := "http://127.0.0.1:" + etcdPeer
	c.etcdURL = etcdURL
	c.run(tb, "etcd",
		"--name=default",
		// StoreUnchecked's HTTP API (etcd's default, said for the reader).
		"--enable-grpc-gateway",
		"--data-dir="+filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=default="+peerURL,
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	c.waitHTTP(ctx, tb, "etcd", http.DefaultClient, etcdURL+"/health", "")
	c.StartTimes["etcd"] = time.Since(t0)

	// kube-apiserver, with a service-account key pair and a token file.
	t0 = time.Now()
	saKey := filepath.Join(c.Dir, "sa.key")
	saPub := filepath.Join(c.Dir, "sa.pub")
	writeKeyPair(tb, saKey, saPub)
	c.token = randomHex(tb, 16)
	tokens := filepath.Join(c.Dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(c.token+`,admin,admin,"system:masters"`+"\n"), 0o600); err != nil {
		tb.Fatal(err)
	}
	certDir := filepath.Join(c.Dir, "pki")
	apiPort := freePort(tb)
	c.Server = "https://127.0.0.1:" + apiPort
	c.apiArgs = []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + apiPort,
		"--cert-dir=" + certDir,
		"--token-auth-file=" + tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + saPub,
		"--service-account-signing-key-file=" + saKey,
		"--service-cluster-ip-range=" + opts.ServiceCIDR,
		// No other API server updates the kubernetes Service's endpoints,
		// and this one must not advertise itself there.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
		"-v=1",
	}
	c.apiserver = c.run(tb, "kube-apiserver", c.apiArgs...)
	// The API server writes its self-signed certificate (with its CA)
	// before it listens, but not atomically: the file can be there and
	// still empty (it was, under emulation).
	crt := filepath.Join(certDir, "apiserver.crt")
	c.waitFor(ctx, tb, "kube-apiserver", func() error {
		var err error
		if c.caPEM, err = os.ReadFile(crt); err != nil {
			return err
		}
		if !x509.NewCertPool().AppendCertsFromPEM(c.caPEM) {
			return fmt.Errorf("no certificate in %s yet", crt)
		}
		return nil
	})
	c.waitAPIServer(ctx, tb)
	c.StartTimes["kube-apiserver"] = time.Since(t0)
	// Complete now that the server listens.
	var err error
	if c.caPEM, err = os.ReadFile(crt); err != nil {
		tb.Fatalf("kubetest: %v", err)
	}

	c.Kubeconfig = c.WriteKubeconfig(tb, filepath.Join(c.Dir, "kubeconfig"), c.Server)
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		tb.Fatalf("kubetest: %v", err)
	}
	// Tests create objects by the thousand: no client-side rate limit.
	cfg.QPS, cfg.Burst = 1000, 1000
	c.Config = cfg
	if c.Client, err = kubernetes.NewForConfig(cfg); err != nil {
		tb.Fatalf("kubetest: %v", err)
	}

	// kube-controller-manager: service accounts in new namespaces,
	// EndpointSlices, the DaemonSet controller, node lifecycle. No kubelet
	// renews a Node's lease here, so with the default grace period (50 s)
	// the node lifecycle controller would mark every Node NotReady, and
	// its Pods not ready, within a minute of the Node's creation: the
	// grace period outlasts any test.
	t0 = time.Now()
	c.run(tb, "kube-controller-manager",
		"--kubeconfig="+c.Kubeconfig,
		"--authentication-kubeconfig="+c.Kubeconfig,
		"--authorization-kubeconfig="+c.Kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port="+freePort(tb),
		"--cert-dir="+filepath.Join(c.Dir, "kcm-pki"),
		"--service-account-private-key-file="+saKey,
		"--root-ca-file="+crt,
		"--use-service-account-credentials=false",
		"--leader-elect=false",
		"--node-monitor-grace-period="+nodeMonitorGracePeriod.String(),
		"--profiling=false",
		"-v=1",
	)
	c.waitFor(ctx, tb, "kube-controller-manager", func() error {
		_, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	c.StartTimes["kube-controller-manager"] = time.Since(t0)
	tb.Logf("kubetest: control plane at %s ready: etcd %v, kube-apiserver %v, kube-controller-manager %v",
		c.Server, c.StartTimes["etcd"].Round(time.Millisecond), c.StartTimes["kube-apiserver"].Round(time.Millisecond),
		c.StartTimes["kube-controller-manager"].Round(time.Millisecond))
	return c
}

// waitAPIServer waits until the API server answers /readyz.
func (c *Cluster) waitAPIServer(ctx context.Context, tb testing.TB) {
	tb.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.caPEM)
	tlsClient := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 5 * time.Second}
	c.waitHTTP(ctx, tb, "kube-apiserver", tlsClient, c.Server+"/readyz", c.token)
}

// RestartAPIServer stops kube-apiserver (SIGTERM, as a rolling upgrade
// does, and SIGKILL restartStopTimeout later), then starts it again on the
// same address, with the same etcd (so the same objects), and waits until
// it is ready. Its watch cache starts afresh: clients' watches end, and a
// client may have to list again. The new process is stopped with the rest
// of the control plane, not when tb ends (tb may be a subtest, or one of
// the tests sharing the cluster).
func (c *Cluster) RestartAPIServer(tb testing.TB) {
	tb.Helper()
	c.apiserver.stop(restartStopTimeout)
	*c.apiserver = *c.start(tb, "kube-apiserver", c.apiArgs...)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	c.waitAPIServer(ctx, tb)
}

// StoreUnchecked writes obj as JSON under key in etcd (such as
// /registry/services/specs/NAMESPACE/NAME for a Service), past the API
// server's validation and admission, through etcd's HTTP API. It is for
// objects that the API server would refuse but that clients must survive
// all the same (a ClusterIP two Services share, an address that does not
// parse: a restored backup, a bug in an allocator). obj must carry its
// apiVersion and kind, and no resourceVersion. The API server's watch
// cache picks it up as any change.
func (c *Cluster) StoreUnchecked(tb testing.TB, key string, obj any) {
	tb.Helper()
	value, err := json.Marshal(obj)
	if err != nil {
		tb.Fatalf("kubetest: encode %s: %v", key, err)
	}
	body, err := json.Marshal(map[string]string{"key": base64.StdEncoding.EncodeToString([]byte(key)), "value": base64.StdEncoding.EncodeToString(value)})
	if err != nil {
		tb.Fatal(err)
	}
	resp, err := http.Post(c.etcdURL+"/v3/kv/put", "application/json", bytes.NewReader(body))
	if err != nil {
		tb.Fatalf("kubetest: etcd put %s: %v", key, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(resp.Body)
		tb.Fatalf("kubetest: etcd put %s: %s: %s", key, resp.Status, msg)
	}
}

// WriteKubeconfig writes a kubeconfig for the administrator to path with
// server as the API server's URL (a proxy's, say), and returns path.
func (c *Cluster) WriteKubeconfig(tb testing.TB, path, server string) string {
	tb.Helper()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["kubetest"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: c.caPEM}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: c.token}
	kc.Contexts["kubetest"] = &clientcmdapi.Context{Cluster: "kubetest", AuthInfo: "admin", Namespace: "default"}
	kc.CurrentContext = "kubetest"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		tb.Fatalf("kubetest: write kubeconfig: %v", err)
	}
	return path
}

// Kubectl runs kubectl against the cluster with stdin (if not nil) and
// returns its combined output; a failure fails tb.
func (c *Cluster) Kubectl(tb testing.TB, stdin []byte, args ...string) string {
	tb.Helper()
	out, err := c.KubectlErr(stdin, args...)
	if err != nil {
		tb.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// KubectlErr is Kubectl that returns the error.
func (c *Cluster) KubectlErr(stdin []byte, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(c.bin, "kubectl"), append([]string{"--kubeconfig=" + c.Kubeconfig}, args...)...)
	if stdin != nil {
		cmd.Stdin = strings.NewReader(string(stdin))
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// proc is a running component.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once it is reaped
}

// stop sends SIGTERM and waits for the process to exit, killing it after
// timeout.
func (p *proc) stop(timeout time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// run starts a component, logging to Dir/<name>.log (appending, across
// restarts), and stops it when tb ends: the process p stands for then,
// which RestartAPIServer may have replaced.
func (c *Cluster) run(tb testing.TB, name string, args ...string) *proc {
	tb.Helper()
	p := c.start(tb, name, args...)
	logPath := filepath.Join(c.Dir, name+".log")
	tb.Cleanup(func() {
		p.stop(stopTimeout)
		if tb.Failed() {
			tb.Logf("kubetest: %s log (tail):\n%s", name, tail(logPath, 40))
		}
	})
	return p
}

// start starts a component, logging to Dir/<name>.log (appending).
func (c *Cluster) start(tb testing.TB, name string, args ...string) *proc {
	tb.Helper()
	logPath := filepath.Join(c.Dir, name+".log")
	log, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(c.bin, name), args...)
	cmd.Stdout, cmd.Stderr = log, log
	// Killed if the test binary dies before its cleanup runs.
	done := make(chan struct{})
	if err := testenv.StartTied(cmd, func(error) {
		log.Close()
		close(done)
	}); err != nil {
		log.Close()
		tb.Fatalf("kubetest: start %s: %v", name, err)
	}
	return &proc{cmd: cmd, done: done}
}

// waitFor polls ready until it returns nil, failing tb at ctx's deadline
// with the component's log.
func (c *Cluster) waitFor(ctx context.Context, tb testing.TB, name string, ready func() error) {
	tb.Helper()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := ready()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			tb.Fatalf("kubetest: %s not ready after %v: %v\nlog (tail):\n%s", name, startTimeout, err, tail(filepath.Join(c.Dir, name+".log"), 40))
		case <-tick.C:
		}
	}
}

func (c *Cluster) waitHTTP(ctx context.Context, tb testing.TB, name string, client *http.Client, url, token string) {
	tb.Helper()
	c.waitFor(ctx, tb, name, func() error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", url, resp.Status)
		}
		return nil
	})
}

// Namespace creates a namespace with labels (Pod Security levels, say)
// and waits for its default service account.
func (c *Cluster) Namespace(tb testing.TB, name string, labels map[string]string) {
	tb.Helper()
	ctx := context.Background()
	_, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("kubetest: create namespace %s: %v", name, err)
	}
	wctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	c.waitFor(wctx, tb, "kube-controller-manager", func() error {
		_, err := c.Client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// Node creates a Node named name, Ready for nodeMonitorGracePeriod
// (then the node lifecycle controller, seeing no kubelet, would mark it
// NotReady and its Pods not ready).
func (c *Cluster) Node(tb testing.TB, name string) *corev1.Node {
	tb.Helper()
	ctx := context.Background()
	nodes := c.Client.CoreV1().Nodes()
	if _, err := nodes.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		tb.Fatalf("kubetest: create node %s: %v", name, err)
	}
	// The node lifecycle controller taints a new node at once: retry on
	// conflicts.
	for range 10 {
		n, err := nodes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			tb.Fatalf("kubetest: get node %s: %v", name, err)
		}
		now := metav1.Now()
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: now, LastTransitionTime: now}}
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}}
		n, err = nodes.UpdateStatus(ctx, n, metav1.UpdateOptions{})
		if err == nil {
			return n
		}
		if !apierrors.IsConflict(err) {
			tb.Fatalf("kubetest: node %s status: %v", name, err)
		}
	}
	tb.Fatalf("kubetest: node %s status: conflicts on every try", name)
	return nil
}

// Pod creates pod (its namespace must exist) and returns it as stored.
func (c *Cluster) Pod(tb testing.TB, pod *corev1.Pod) *corev1.Pod {
	tb.Helper()
	p, err := c.Client.CoreV1().Pods(pod.Namespace).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("kubetest: create pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
	return p
}

// SetPodStatus sets a pod's status through the status subresource, as a
// kubelet would: set(status) edits the stored pod's status and is retried
// on conflicts.
func (c *Cluster) SetPodStatus(tb testing.TB, namespace, name string, set func(*corev1.PodStatus)) *corev1.Pod {
	tb.Helper()
	ctx := context.Background()
	pods := c.Client.CoreV1().Pods(namespace)
	for range 10 {
		p, err := pods.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			tb.Fatalf("kubetest: get pod %s/%s: %v", namespace, name, err)
		}
		set(&p.Status)
		p, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{})
		if err == nil {
			return p
		}
		if !apierrors.IsConflict(err) {
			tb.Fatalf("kubetest: pod %s/%s status: %v", namespace, name, err)
		}
	}
	tb.Fatalf("kubetest: pod %s/%s status: conflicts on every try", namespace, name)
	return nil
}

// RunningStatus returns set for SetPodStatus that makes a pod Running and
// Ready with the given container ids (runtime://id), in the order of its
// containers, and ip as its pod IP.
func RunningStatus(pod *corev1.Pod, ip string, containerIDs ...string) func(*corev1.PodStatus) {
	return func(s *corev1.PodStatus) {
		now := metav1.Now()
		s.Phase = corev1.PodRunning
		s.PodIP = ip
		s.PodIPs = []corev1.PodIP{{IP: ip}}
		s.StartTime = &now
		s.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}}
		s.ContainerStatuses = nil
		for i, ctr := range pod.Spec.Containers {
			st := corev1.ContainerStatus{Name: ctr.Name, Image: ctr.Image, Ready: true,
				State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}}
			if i < len(containerIDs) {
				st.ContainerID = containerIDs[i]
			}
			s.ContainerStatuses = append(s.ContainerStatuses, st)
		}
	}
}

func freePort(tb testing.TB) string {
	tb.Helper()
	_, port, err := net.SplitHostPort(testenv.FreeLoopbackAddr(tb))
	if err != nil {
		tb.Fatal(err)
	}
	return port
}

func writeKeyPair(tb testing.TB, keyPath, pubPath string) {
	tb.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		tb.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		tb.Fatal(err)
	}
}

func randomHex(tb testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		tb.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
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
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}
