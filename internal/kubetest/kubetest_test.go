package kubetest

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func TestCluster(t *testing.T) {
	c := Start(t)
	ctx := context.Background()
	c.Node(t, "node-a")
	c.Namespace(t, "ns", map[string]string{"team": "a"})
	pod := c.Pod(t, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec:       corev1.PodSpec{NodeName: "node-a", Containers: []corev1.Container{{Name: "app", Image: "x"}}},
	})
	c.SetPodStatus(t, "ns", "web", RunningStatus(pod, "10.1.0.2", "containerd://abc"))
	got, err := c.Client.CoreV1().Pods("ns").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != corev1.PodRunning || got.Status.PodIP != "10.1.0.2" || len(got.Status.ContainerStatuses) != 1 ||
		got.Status.ContainerStatuses[0].ContainerID != "containerd://abc" {
		t.Errorf("status %+v", got.Status)
	}
	if out := c.Kubectl(t, nil, "get", "pod", "-n", "ns", "web", "-o", "jsonpath={.status.containerStatuses[0].containerID}"); out != "containerd://abc" {
		t.Errorf("kubectl: %q", out)
	}

	// Past the API server, into etcd: read back through it.
	c.StoreUnchecked(t, "/registry/configmaps/ns/unchecked", &corev1.ConfigMap{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "ConfigMap"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "unchecked", UID: "00000000-0000-0000-0000-000000000001"},
		Data:       map[string]string{"k": "v"},
	})
	cm, err := c.Client.CoreV1().ConfigMaps("ns").Get(ctx, "unchecked", metav1.GetOptions{})
	if err != nil || cm.Data["k"] != "v" {
		t.Errorf("config map stored in etcd: %+v, %v", cm, err)
	}

	// Restarted: the same objects, at the same address.
	c.RestartAPIServer(t)
	if _, err := c.Client.CoreV1().Pods("ns").Get(ctx, "web", metav1.GetOptions{}); err != nil {
		t.Errorf("after a restart: %v", err)
	}

	// Through the proxy: reachable while up, not while down.
	p := c.Proxy(t, true)
	cfg, err := clientcmd.BuildConfigFromFlags("", c.WriteKubeconfig(t, filepath.Join(t.TempDir(), "kc"), "https://"+p.Addr))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Timeout = 5e9
	client := kubernetes.NewForConfigOrDie(cfg)
	if _, err := client.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
		t.Fatalf("proxy up: %v", err)
	}
	p.SetUp(false)
	if _, err := client.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}); err == nil {
		t.Fatal("proxy down: request succeeded")
	} else if !strings.Contains(err.Error(), "EOF") && !strings.Contains(err.Error(), "reset") && !strings.Contains(err.Error(), "closed") {
		t.Logf("proxy down: %v", err)
	}
}
