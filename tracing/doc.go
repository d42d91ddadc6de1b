// Package tracing will turn outlier events that leave the kernel through a
// ring buffer (a slow syscall, a long run-queue wait, a retransmit) into
// OTLP spans with kernel timestamps. Nothing here yet: the syscall probe
// aggregates only, and the daemon exports no spans.
package tracing
