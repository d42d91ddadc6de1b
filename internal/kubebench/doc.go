// Package kubebench compares ktel's socket load balancer fed by the
// Kubernetes API (KTEL_LB_SOURCE=kubernetes) with kube-proxy from the same
// release, in its iptables and nftables modes, against one real control
// plane (internal/kubetest): network-programming latency while endpoints
// churn, connect latency and resident memory, for 1 to 10,000 Services.
// Everything is in its test (TestBenchKube, make bench-kube), built only
// with the kubebench tag so that `go test ./...` neither runs nor skips it,
// and run only with KTEL_BENCH_KUBE=1; BENCHMARKS-lb.md has the results.
package kubebench
