// Package kubelb is the Kubernetes source of the socket load balancer: it
// watches Services and EndpointSlices through client-go informers and
// turns them, following kube-proxy's semantics, into the model the
// services file also produces ([]lb.Service), which it applies in batches
// once both informers have synced: the first time whole, then Service by
// Service, only those that changed (model). It knows nothing of BPF or Prometheus
// (see Metrics).
package kubelb
