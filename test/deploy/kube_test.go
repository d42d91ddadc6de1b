package deploy

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// serviceMonitorCRD stands in for the Prometheus Operator's CRD, so that
// overlays with a ServiceMonitor apply. Its schema is open: deploy/validate
// decodes ServiceMonitors strictly against the operator's Go types.
const serviceMonitorCRD = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
`

// deployTool finds helm or kustomize as deploy/validate does: $HELM or
// $KUSTOMIZE, else .cache/deploy/bin (make deploy-go-tools).
func deployTool(t *testing.T, env, name string) string {
	t.Helper()
	if p := os.Getenv(env); p != "" {
		return p
	}
	p, err := filepath.Abs(filepath.Join(root, ".cache/deploy/bin", name))
	if err == nil {
		if _, err = os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatalf("%s not found ($%s, %s): build it with make deploy-go-tools", name, env, p)
	return ""
}

func render(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, stderr)
	}
	return out
}

// TestKubeApply applies every kustomize entry point and the Helm chart to
// a real API server with server-side apply, checks the RBAC they grant,
// and that Pod Security admits ktel's pods only where the namespace
// enforces "privileged".
func TestKubeApply(t *testing.T) {
	kubetest.Gate(t)
	kustomize := deployTool(t, "KUSTOMIZE", "kustomize")
	helm := deployTool(t, "HELM", "helm")
	c := kubetest.Start(t)
	c.Kubectl(t, []byte(serviceMonitorCRD), "apply", "--server-side", "-f", "-")
	c.Kubectl(t, nil, "wait", "--for=condition=Established", "--timeout=60s", "crd/servicemonitors.monitoring.coreos.com")

	apply := func(t *testing.T, manifests []byte) {
		t.Helper()
		out := c.Kubectl(t, manifests, "apply", "--server-side", "--field-manager=ktel-test", "-f", "-")
		t.Logf("%s", out)
	}
	daemonSet := func(t *testing.T, ns, name string) *appsv1.DaemonSet {
		t.Helper()
		ds, err := c.Client.AppsV1().DaemonSets(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return ds
	}
	canI := func(t *testing.T, sa string, want bool, verb, resource string) {
		t.Helper()
		out, err := c.KubectlErr(nil, "auth", "can-i", verb, resource, "--as=system:serviceaccount:"+sa)
		got := strings.TrimSpace(out) == "yes"
		if got != want || (err != nil && got) {
			t.Errorf("%s can %s %s: %q (%v), want %v", sa, verb, resource, strings.TrimSpace(out), err, want)
		}
	}
	checkRBAC := func(t *testing.T, sa string) {
		t.Helper()
		for _, r := range []string{"pods", "services", "endpointslices.discovery.k8s.io"} {
			for _, verb := range []string{"get", "list", "watch"} {
				canI(t, sa, true, verb, r)
			}
			canI(t, sa, false, "update", r)
		}
		canI(t, sa, false, "create", "pods")
		canI(t, sa, false, "get", "secrets")
		canI(t, sa, false, "list", "nodes")
	}

	// Each entry point in turn, as one would move between them: the
	// DaemonSet the last one applied is what it renders.
	for _, dir := range []string{"deploy/kubernetes/overlays/packets", "deploy/kubernetes/overlays/prometheus-operator", "deploy/kubernetes"} {
		t.Run("kustomize "+dir, func(t *testing.T) {
			apply(t, render(t, kustomize, "build", dir))
			ds := daemonSet(t, "ktel", "ktel")
			env := map[string]corev1.EnvVar{}
			for _, e := range ds.Spec.Template.Spec.Containers[0].Env {
				env[e.Name] = e
			}
			if want := strings.HasSuffix(dir, "packets"); ds.Spec.Template.Spec.HostNetwork != want {
				t.Errorf("hostNetwork %v, want %v", ds.Spec.Template.Spec.HostNetwork, want)
			}
			if f := env["KTEL_NODE_NAME"].ValueFrom; f == nil || f.FieldRef == nil || f.FieldRef.FieldPath != "spec.nodeName" {
				t.Errorf("KTEL_NODE_NAME %+v, want the downward API's spec.nodeName", env["KTEL_NODE_NAME"])
			}
			if sa := ds.Spec.Template.Spec.ServiceAccountName; sa != "ktel" {
				t.Errorf("service account %q", sa)
			}
			_, err := c.Client.CoreV1().ServiceAccounts("ktel").Get(context.Background(), "ktel", metav1.GetOptions{})
			if err != nil {
				t.Error(err)
			}
			checkRBAC(t, "ktel:ktel")
		})
	}

	for _, values := range []string{"", "deploy/helm/ktel/ci/all-probes-values.yaml"} {
		name := "default"
		args := []string{"template", "ktel", "deploy/helm/ktel", "--namespace", "monitoring"}
		if values != "" {
			name = filepath.Base(values)
			args = append(args, "-f", values)
		}
		t.Run("helm "+name, func(t *testing.T) {
			c.Kubectl(t, []byte(`apiVersion: v1
kind: Namespace
metadata:
  name: monitoring
  labels:
    pod-security.kubernetes.io/enforce: privileged
`), "apply", "--server-side", "-f", "-")
			apply(t, render(t, helm, args...))
			ds := daemonSet(t, "monitoring", "ktel")
			if sa := ds.Spec.Template.Spec.ServiceAccountName; sa != "ktel" {
				t.Errorf("service account %q", sa)
			}
			checkRBAC(t, "monitoring:ktel")
		})
	}

	// Pod Security. The DaemonSet's pod template, as a pod on a node, in
	// namespaces enforcing each level.
	t.Run("pod security", func(t *testing.T) {
		ctx := context.Background()
		ds := daemonSet(t, "ktel", "ktel")
		node := c.Node(t, "node-a")
		for _, tc := range []struct {
			level string
			admit bool
		}{{"baseline", false}, {"restricted", false}, {"privileged", true}} {
			ns := "ps-" + tc.level
			c.Namespace(t, ns, map[string]string{"pod-security.kubernetes.io/enforce": tc.level})
			sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: ds.Spec.Template.Spec.ServiceAccountName, Namespace: ns}}
			if _, err := c.Client.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "ktel-test", Namespace: ns, Labels: ds.Spec.Template.Labels},
				Spec:       *ds.Spec.Template.Spec.DeepCopy(),
			}
			pod.Spec.NodeName = node.Name
			_, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
			switch {
			case tc.admit && err != nil:
				t.Errorf("%s: pod refused: %v", tc.level, err)
			case !tc.admit && err == nil:
				t.Errorf("%s: pod admitted", tc.level)
			case !tc.admit:
				msg := err.Error()
				if !strings.Contains(msg, `violates PodSecurity "`+tc.level) || !strings.Contains(msg, "hostPath") || !strings.Contains(msg, "capabilities") {
					t.Errorf("%s: refused, but not for its host paths and capabilities: %v", tc.level, err)
				}
				t.Logf("%s: %v", tc.level, err)
			}
		}

		// The DaemonSet in the baseline namespace: its controller's
		// creates are refused, and it has no pod.
		bds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "ktel", Namespace: "ps-baseline"}, Spec: *ds.Spec.DeepCopy()}
		if _, err := c.Client.AppsV1().DaemonSets("ps-baseline").Create(ctx, bds, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(60 * time.Second); ; testenv.Sleep(t, 200*time.Millisecond) {
			events, err := c.Client.CoreV1().Events("ps-baseline").List(ctx, metav1.ListOptions{FieldSelector: "reason=FailedCreate"})
			if err != nil {
				t.Fatal(err)
			}
			if len(events.Items) > 0 {
				if msg := events.Items[0].Message; !strings.Contains(msg, "violates PodSecurity") {
					t.Errorf("DaemonSet in baseline namespace: FailedCreate for another reason: %s", msg)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("DaemonSet in baseline namespace: no FailedCreate event after 60 s")
			}
		}
		if pods, err := c.Client.CoreV1().Pods("ps-baseline").List(ctx, metav1.ListOptions{}); err != nil || len(pods.Items) != 0 {
			t.Errorf("baseline namespace: %v pods (%v), want none", len(pods.Items), err)
		}

		// And the DaemonSet controller creates the pod for the node in
		// the base's own namespace, which enforces "privileged".
		deadline := time.Now().Add(60 * time.Second)
		for {
			// No scheduler binds it: the controller pins it to the node
			// by node affinity.
			pods, err := c.Client.CoreV1().Pods("ktel").List(ctx, metav1.ListOptions{
				LabelSelector: metav1.FormatLabelSelector(ds.Spec.Selector)})
			if err != nil {
				t.Fatal(err)
			}
			if len(pods.Items) == 1 {
				p := pods.Items[0]
				if ref := metav1.GetControllerOf(&p); ref == nil || ref.Kind != "DaemonSet" || ref.Name != "ktel" {
					t.Errorf("pod %s not the DaemonSet's: %+v", p.Name, ref)
				}
				if a := p.Spec.Affinity; a == nil || a.NodeAffinity == nil || !strings.Contains(a.NodeAffinity.String(), `Values:[`+node.Name+`]`) {
					t.Errorf("pod %s not pinned to %s: %+v", p.Name, node.Name, a)
				}
				break
			}
			if time.Now().After(deadline) {
				events := c.Kubectl(t, nil, "get", "events", "-n", "ktel", "-o", "json")
				var list corev1.EventList
				_ = json.Unmarshal([]byte(events), &list)
				for _, e := range list.Items {
					t.Logf("event %s %s: %s", e.InvolvedObject.Name, e.Reason, e.Message)
				}
				t.Fatalf("no DaemonSet pod on %s after 60 s (%d pods)", node.Name, len(pods.Items))
			}
			testenv.Sleep(t, 200*time.Millisecond)
		}
	})
}
