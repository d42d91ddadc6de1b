// Package kubeclient is how ktel reaches the Kubernetes API server: one
// client configuration, from KUBECONFIG or the Pod's service account, for
// every part of ktel that watches it (workload attribution, the lb
// probe's Kubernetes source), so that they cannot read it differently.
package kubeclient

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Config is the client configuration from kubeconfig, the value of
// $KUBECONFIG: one or more files separated by ':', merged as kubectl
// merges them (the first file to set a value wins; missing files are
// skipped, but not all of them). Empty: the Pod's service account
// (in-cluster). Errors name KUBECONFIG, since that is what to fix.
func Config(kubeconfig string) (*rest.Config, error) {
	var (
		c   *rest.Config
		err error
	)
	if kubeconfig == "" {
		if c, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("kubernetes client configuration: KUBECONFIG is not set and the in-cluster configuration (a Pod's service account) is unavailable: %w", err)
		}
	} else {
		files := filepath.SplitList(kubeconfig)
		if !anyExists(files) {
			return nil, fmt.Errorf("kubernetes client configuration: KUBECONFIG=%q: none of its files exists", kubeconfig)
		}
		rules := &clientcmd.ClientConfigLoadingRules{Precedence: files}
		if c, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, nil).ClientConfig(); err != nil {
			return nil, fmt.Errorf("kubernetes client configuration: KUBECONFIG=%q: %w", kubeconfig, err)
		}
	}
	c.UserAgent = "ktel"
	// Protobuf costs the API server and ktel less than JSON for lists of
	// thousands of objects.
	c.ContentType = "application/vnd.kubernetes.protobuf"
	c.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	return c, nil
}

func anyExists(files []string) bool {
	for _, f := range files {
		if _, err := os.Stat(f); err == nil || !errors.Is(err, os.ErrNotExist) {
			return true
		}
	}
	return false
}
