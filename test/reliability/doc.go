// Package reliability holds ktel's reliability tests (issue 8): faults
// (start/stop cycles, SIGKILL), invalid configuration and missing kernel
// features, bounded maps and label caps under overflow, and concurrent
// scrapes. They drive the built binary, are privileged (internal/testenv)
// and must not run in parallel with each other.
package reliability
