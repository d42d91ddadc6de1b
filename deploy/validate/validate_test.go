package main

// Renders every kustomization and the Helm chart, decodes each object
// strictly (Decode) and checks the properties the manifests promise: no
// privileged mode, only the BPF capabilities, read-only host paths, host
// network exactly with the packet probe, probes on /healthz, the downward
// API in OTEL_RESOURCE_ATTRIBUTES, selectors that match.
//
// Needs kustomize and helm: $KUSTOMIZE and $HELM, else ../../.cache/deploy/bin/ (deploy/validate/install-tools.sh),
// else $PATH. Nothing is fetched.

import (
	"errors"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
)

const root = "../.." // the repository

// tool finds a rendering tool; the test fails (it does not skip) without it.
func tool(t *testing.T, env, name string) string {
	t.Helper()
	if p := os.Getenv(env); p != "" {
		return p
	}
	if p, err := filepath.Abs(filepath.Join(root, ".cache/deploy/bin", name)); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found ($%s, %s/.cache/deploy/bin, $PATH): run deploy/validate/install-tools.sh", name, env, root)
	}
	return p
}

func run(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("%s %s: %v\n%s%s", filepath.Base(name), strings.Join(args, " "), err, out, ee.Stderr)
		}
		t.Fatalf("%s %s: %v", filepath.Base(name), strings.Join(args, " "), err)
	}
	return out
}

func TestKustomize(t *testing.T) {
	kustomize := tool(t, "KUSTOMIZE", "kustomize")
	dirs := []string{"deploy/kubernetes", "deploy/kubernetes/base"}
	overlays, _ := filepath.Glob(filepath.Join(root, "deploy/kubernetes/overlays/*"))
	for _, o := range overlays {
		rel, _ := filepath.Rel(root, o)
		dirs = append(dirs, rel)
	}
	if len(overlays) == 0 {
		t.Fatal("no overlays found")
	}
	for _, dir := range dirs {
		t.Run(strings.ReplaceAll(dir, "/", "_"), func(t *testing.T) {
			objs := decode(t, run(t, kustomize, "build", dir))
			checkObjects(t, objs, true)
		})
	}
}

func TestHelm(t *testing.T) {
	helm := tool(t, "HELM", "helm")
	const chart = "deploy/helm/ktel"
	for _, values := range []string{"", chart + "/ci/all-probes-values.yaml", chart + "/ci/lb-kubernetes-values.yaml"} {
		name := "default"
		args := []string{}
		if values != "" {
			name = filepath.Base(values)
			args = []string{"-f", values}
		}
		t.Run(name, func(t *testing.T) {
			out := run(t, helm, append([]string{"lint", "--strict", chart}, args...)...)
			t.Logf("%s", out)
			objs := decode(t, run(t, helm, append([]string{"template", "ktel", chart, "--namespace", "monitoring"}, args...)...))
			checkObjects(t, objs, false)
		})
	}
}

// TestStrict makes sure Decode is strict: a field the API does not have is
// an error, as is a kind no scheme knows.
func TestStrict(t *testing.T) {
	bad := map[string]string{
		"unknown field":            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      hostNetwrk: true\n",
		"unknown kind":             "apiVersion: example.com/v1\nkind: Nothing\nmetadata: {name: x}\n",
		"typo in a ServiceMonitor": "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\nspec:\n  endpoint: []\n",
		"duplicate field":          "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: None, clusterIP: None}\n",
	}
	for name, doc := range bad {
		if _, err := Decode([]byte(doc)); err == nil {
			t.Errorf("%s: decoded without error:\n%s", name, doc)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if objs, err := Decode([]byte("# only a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")); err != nil || len(objs) != 1 {
		t.Errorf("valid stream: %d objects, %v", len(objs), err)
	}
}

func decode(t *testing.T, stream []byte) []runtime.Object {
	t.Helper()
	objs, err := Decode(stream)
	if err != nil {
		t.Fatalf("strict decoding: %v\n%s", err, stream)
	}
	for _, o := range objs {
		t.Logf("ok %s %s", o.GetObjectKind().GroupVersionKind().Kind, objName(o))
	}
	return objs
}

// baseCaps are the capabilities ktel needs (deploy/kubernetes/base/daemonset.yaml says why).
var baseCaps = []corev1.Capability{"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}

func checkObjects(t *testing.T, objs []runtime.Object, exactCaps bool) {
	t.Helper()
	var (
		dss  []*appsv1.DaemonSet
		svcs []*corev1.Service
		sms  []*monitoringv1.ServiceMonitor
		cms  = map[string]*corev1.ConfigMap{}
	)
	for _, o := range objs {
		switch o := o.(type) {
		case *appsv1.DaemonSet:
			dss = append(dss, o)
		case *corev1.Service:
			svcs = append(svcs, o)
		case *monitoringv1.ServiceMonitor:
			sms = append(sms, o)
		case *corev1.ConfigMap:
			cms[o.Name] = o
		}
	}
	if len(dss) != 1 || len(svcs) != 1 {
		t.Fatalf("want one DaemonSet and one Service, got %d and %d", len(dss), len(svcs))
	}
	ds, svc := dss[0], svcs[0]
	checkDaemonSet(t, ds, cms, exactCaps)

	podLabels := labels.Set(ds.Spec.Template.Labels)
	if sel := labels.SelectorFromSet(ds.Spec.Selector.MatchLabels); !sel.Matches(podLabels) {
		t.Errorf("DaemonSet selector %v does not match its pod labels %v", sel, podLabels)
	}
	if sel := labels.SelectorFromSet(svc.Spec.Selector); len(svc.Spec.Selector) == 0 || !sel.Matches(podLabels) {
		t.Errorf("Service selector %v does not match the pod labels %v", sel, podLabels)
	}
	if svc.Namespace == "" || svc.Namespace != ds.Namespace {
		t.Errorf("Service namespace %q, DaemonSet namespace %q", svc.Namespace, ds.Namespace)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != "metrics" || svc.Spec.Ports[0].TargetPort.StrVal != "metrics" {
		t.Errorf("Service ports %+v, want one named metrics targeting the container port metrics", svc.Spec.Ports)
	}
	for _, sm := range sms {
		if sm.Namespace != svc.Namespace {
			t.Errorf("ServiceMonitor in namespace %q, Service in %q", sm.Namespace, svc.Namespace)
		}
		if sel := labels.SelectorFromSet(sm.Spec.Selector.MatchLabels); !sel.Matches(labels.Set(svc.Labels)) {
			t.Errorf("ServiceMonitor selector %v does not match the Service labels %v", sel, svc.Labels)
		}
		if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" {
			t.Errorf("ServiceMonitor endpoints %+v, want one on port metrics", sm.Spec.Endpoints)
		}
		if len(sm.Spec.ScrapeProtocols) == 0 || sm.Spec.ScrapeProtocols[0] != monitoringv1.PrometheusProto {
			t.Errorf("ServiceMonitor scrape protocols %v: PrometheusProto must come first (native histograms)", sm.Spec.ScrapeProtocols)
		}
		if sm.Spec.ScrapeClassicHistograms == nil || !*sm.Spec.ScrapeClassicHistograms {
			t.Error("ServiceMonitor does not keep classic histograms")
		}
	}
}

func checkDaemonSet(t *testing.T, ds *appsv1.DaemonSet, cms map[string]*corev1.ConfigMap, exactCaps bool) {
	t.Helper()
	pod := ds.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	env := map[string]corev1.EnvVar{}
	var order []string
	for _, e := range c.Env {
		env[e.Name] = e
		order = append(order, e.Name)
	}
	probes := strings.Split(env["KTEL_PROBES"].Value, ",")
	if env["KTEL_PROBES"].Value == "" {
		t.Error("KTEL_PROBES not set")
	}

	if pod.HostPID || pod.HostIPC {
		t.Error("hostPID/hostIPC: no probe needs them")
	}
	if want := slices.Contains(probes, "netdev"); pod.HostNetwork != want {
		t.Errorf("hostNetwork %v with probes %v: the packet probe (netdev), and only it, needs the host network", pod.HostNetwork, probes)
	}
	if slices.Contains(probes, "netdev") && env["KTEL_INTERFACES"].Value == "" {
		t.Error("netdev without KTEL_INTERFACES")
	}

	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no container securityContext with capabilities")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation is not false")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("readOnlyRootFilesystem is not true")
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities dropped %v, want [ALL]", sc.Capabilities.Drop)
	}
	add := sc.Capabilities.Add
	if !slices.Equal(add[:min(len(add), len(baseCaps))], baseCaps) || (exactCaps && len(add) != len(baseCaps)) {
		t.Errorf("capabilities added %v, want %v", add, baseCaps)
	}

	hostPaths := map[string]bool{}
	configMaps := map[string]string{}
	for _, v := range pod.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = true
			if slices.Contains([]string{"/", "/proc", "/sys", "/sys/fs/bpf", "/var/run", "/run"}, v.HostPath.Path) {
				t.Errorf("volume %s mounts host path %s", v.Name, v.HostPath.Path)
			}
		}
		if v.ConfigMap != nil {
			configMaps[v.Name] = v.ConfigMap.Name
		}
	}
	mounted := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounted[m.Name] = m.MountPath
		if hostPaths[m.Name] && !m.ReadOnly {
			t.Errorf("host path volume %s mounted read-write at %s", m.Name, m.MountPath)
		}
	}
	for _, p := range []string{"/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/cgroup"} {
		if !slices.Contains(slices.Collect(maps.Values(mounted)), p) {
			t.Errorf("%s not mounted", p)
		}
	}
	if slices.Contains(probes, "lb") && env["KTEL_LB_SOURCE"].Value == "kubernetes" {
		if file, set := env["KTEL_LB_SERVICES_FILE"]; set {
			t.Errorf("KTEL_LB_SOURCE=kubernetes with KTEL_LB_SERVICES_FILE=%q: ktel refuses both", file.Value)
		}
	} else if slices.Contains(probes, "lb") {
		file := env["KTEL_LB_SERVICES_FILE"].Value
		ok := false
		for vol, cm := range configMaps {
			if dir := mounted[vol]; dir != "" && filepath.Dir(file) == dir {
				if _, exists := cms[cm]; !exists {
					t.Errorf("ConfigMap %s (volume %s) is not rendered", cm, vol)
				} else if _, has := cms[cm].Data[filepath.Base(file)]; !has {
					t.Errorf("ConfigMap %s has no key %s", cm, filepath.Base(file))
				}
				ok = true
			}
		}
		if !ok {
			t.Errorf("KTEL_LB_SERVICES_FILE=%q is not in a mounted ConfigMap", file)
		}
	}

	for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" || p.HTTPGet.Port.StrVal != "metrics" {
			t.Errorf("liveness/readiness probe %+v, want GET /healthz on port metrics", p)
		}
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources %+v: want CPU and memory requests and a memory limit", c.Resources)
	}

	for name, path := range map[string]string{"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name"} {
		e := env[name]
		if e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != path {
			t.Errorf("%s is not from the downward API field %s: %+v", name, path, e)
		}
	}
	attrs := env["OTEL_RESOURCE_ATTRIBUTES"].Value
	if !strings.HasPrefix(attrs, "k8s.node.name=$(NODE_NAME),k8s.pod.name=$(POD_NAME)") {
		t.Errorf("OTEL_RESOURCE_ATTRIBUTES=%q", attrs)
	}
	// $(VAR) expands only variables defined earlier in the list.
	if i := slices.Index(order, "OTEL_RESOURCE_ATTRIBUTES"); i < slices.Index(order, "NODE_NAME") || i < slices.Index(order, "POD_NAME") {
		t.Errorf("OTEL_RESOURCE_ATTRIBUTES comes before NODE_NAME or POD_NAME: %v", order)
	}
	if !strings.HasSuffix(env["KTEL_LISTEN_ADDRESS"].Value, ":9437") || c.Ports[0].ContainerPort != 9437 || c.Ports[0].Name != "metrics" {
		t.Errorf("listen address %q, ports %+v", env["KTEL_LISTEN_ADDRESS"].Value, c.Ports)
	}
}
