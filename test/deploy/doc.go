// Package deploy tests what ships outside the binary: the Dockerfile's
// build (a static binary that runs), the systemd unit, the capabilities
// the manifests grant, and every PromQL expression of the Grafana
// dashboards and the alert rules, run against real Prometheus servers
// scraping a real ktel. The Kubernetes manifests are applied to a real
// API server (internal/kubetest), with their RBAC and Pod Security checked
// there; their strict schema is checked by their own module,
// deploy/validate; the dashboards' schema by dashboards/test.
package deploy
