package daemon

import (
	"fmt"
	"os"

	"k8s.io/client-go/kubernetes"

	"github.com/ktel-dev/ktel/bpf/lb"
	"github.com/ktel-dev/ktel/internal/kubeclient"
	"github.com/ktel-dev/ktel/internal/kubelb"
	"github.com/ktel-dev/ktel/metrics"
)

// lbSource is the lb probe's source of services when it is not the
// services file (KTEL_LB_SOURCE=kubernetes), and the collector of the
// source's own metrics; nil, nil for the file.
func lbSource(e env) (lb.Source, metrics.Collector, error) {
	if e.cfg.LBSource != "kubernetes" {
		return nil, nil, nil
	}
	rc, err := kubeclient.Config(os.Getenv("KUBECONFIG"))
	if err != nil { // checked by validLB already, unless it changed since
		return nil, nil, fmt.Errorf("KTEL_LB_SOURCE=kubernetes: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, nil, fmt.Errorf("kubernetes client: %w", err)
	}
	node := e.cfg.NodeName
	if node == "" {
		// kube-proxy's default too: the node is named after the host.
		if node, err = os.Hostname(); err != nil {
			return nil, nil, fmt.Errorf("node name: %w", err)
		}
	}
	m := metrics.NewLBKube()
	src, err := kubelb.New(kubelb.Options{Client: client, Node: node, Metrics: m, Log: e.log.With("source", "kubernetes")})
	if err != nil {
		return nil, nil, err
	}
	e.log.Info("services from the Kubernetes API server", "host", rc.Host, "node", node)
	return src, m, nil
}

// kubeconfigProblem says why the Kubernetes source would have no client
// configuration (naming KUBECONFIG), or returns "". It reads the files and
// the environment only: an API server that does not answer is not a
// configuration error (the informers retry, and the datapath serves once
// they have synced).
func kubeconfigProblem() string {
	if _, err := kubeclient.Config(os.Getenv("KUBECONFIG")); err != nil {
		return err.Error()
	}
	return ""
}

// withSource adds the source's collector, if any, to the probe's.
func withSource(c, src metrics.Collector) metrics.Collector {
	if src == nil {
		return c
	}
	return metrics.Collectors{c, src}
}
