package lb

import "net/netip"

// The file is one source of []Service; the Kubernetes API (internal/kubelb)
// is another. What sources other than the file need of the file's rules is
// here, so that both produce services the datapath accepts.

// ValidName reports whether name is accepted as a service name: letters,
// digits and _.:/-, starting with a letter or digit, at most 128 bytes.
func ValidName(name string) bool { return validName(name) }

// ParseAddr parses a VIP or backend address as the services file does
// (unicast, no zone, IPv4 in dotted form); the message says what is wrong.
func ParseAddr(s string) (netip.Addr, string) { return parseAddr(s) }

// Service.Affinity is the timeout of ClientIP session affinity: connects
// from one client address should go to the same backend while they come
// less than Affinity apart. It is carried from Kubernetes Services
// (sessionAffinity: ClientIP, sessionAffinityConfig.clientIP.timeoutSeconds)
// and from the services file (sessionAffinity.clientIP.timeoutSeconds). The
// datapath (bpf/lb) takes the client to be the socket's network namespace
// and rounds the timeout up to whole seconds.
