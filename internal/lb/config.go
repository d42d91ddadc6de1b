// Package lb is the control plane of the socket load balancer (bpf/lb):
// the services file and its validation, Maglev tables, the allocation of
// map slots and counter indexes, the atomic application of a new
// configuration to the datapath, and the watcher that reloads the file when
// it changes. It knows nothing of BPF maps (see Datapath) or Prometheus.
package lb

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Protocol is an IP protocol number a service listens on.
type Protocol uint8

const (
	TCP Protocol = 6
	UDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return strconv.Itoa(int(p))
}

// Limits of the services file.
const (
	MaxWeight      = 100 // per backend
	maxNameLen     = 128
	maxErrorsShown = 20
)

// Service is one service of the file: connections to VIP over Protocol are
// sent to one of Backends.
type Service struct {
	Name     string
	VIP      netip.AddrPort
	Protocol Protocol
	Backends []Backend
	Line     int // in the file, for messages
	// Affinity: ClientIP session affinity timeout, 0 for none (model.go).
	Affinity time.Duration
}

// Backend is one destination of a service.
type Backend struct {
	Addr   netip.AddrPort
	Weight uint32 // 1..MaxWeight; relative share of new connections
}

// Key is what identifies a service in the datapath.
type Key struct {
	VIP      netip.AddrPort
	Protocol Protocol
}

// Key of the service.
func (s *Service) Key() Key { return Key{VIP: s.VIP, Protocol: s.Protocol} }

// FieldError is one invalid value of the services file.
type FieldError struct {
	File  string // as given to Parse; may be empty
	Line  int    // 1-based; 0 when unknown
	Field string // e.g. services[2].backends[0].port
	Msg   string
}

func (e *FieldError) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(":")
	}
	if e.Line > 0 {
		b.WriteString(strconv.Itoa(e.Line))
		b.WriteString(":")
	}
	if b.Len() > 0 {
		b.WriteString(" ")
	}
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// validName reports whether name is a valid service name: letters, digits
// and _.:/-, starting with a letter or digit, at most maxNameLen bytes.
func validName(name string) bool {
	if name == "" || len(name) > maxNameLen {
		return false
	}
	for i := 0; i < len(name); i++ {
		switch c := name[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case i > 0 && strings.IndexByte("_.:/-", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// parseProtocol parses tcp or udp, in any case.
func parseProtocol(s string) (Protocol, bool) {
	switch strings.ToLower(s) {
	case "tcp":
		return TCP, true
	case "udp":
		return UDP, true
	}
	return 0, false
}

// parseAddr parses a VIP or backend address; the message says what is
// wrong with it.
func parseAddr(s string) (netip.Addr, string) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, fmt.Sprintf("%q is not an IPv4 or IPv6 address", s)
	case a.Zone() != "":
		return netip.Addr{}, fmt.Sprintf("%q: zones are not supported", s)
	case a.Is4In6():
		return netip.Addr{}, fmt.Sprintf("%q: write IPv4 addresses in dotted form", s)
	case a.IsUnspecified() || a.IsMulticast():
		return netip.Addr{}, fmt.Sprintf("%q is not a unicast address", s)
	}
	return a, ""
}

// Parse reads a services file, YAML or JSON:
//
//	services:
//	  - name: web            # unique; the service label of metrics
//	    vip: 10.96.0.10      # IPv4 or IPv6
//	    port: 80
//	    protocol: tcp        # tcp (default) or udp
//	    backends:            # may be empty: connects are then refused
//	      - address: 10.0.0.2
//	        port: 8080
//	        weight: 1        # 1..100, default 1
//	    sessionAffinity:     # optional: kube-proxy's ClientIP affinity
//	      clientIP: {timeoutSeconds: 10800}  # 1..86400, default 10800
//
// Every problem is reported (up to 20), each as a *FieldError naming the
// file, line and field; errors.Join combines them.
//
// A valid file that is one JSON object, the form programs write, is read
// with encoding/json (decodeServices), with about a fifth of the YAML
// reader's CPU time (BENCHMARKS-lb.md, run 5); any other file, one with errors
// included, is read as YAML, for the messages.
func Parse(file string, data []byte) ([]Service, error) {
	if svcs, ok := decodeServices(data); ok {
		return svcs, nil
	}
	return parseYAML(file, data)
}

// parseYAML reads any YAML, JSON included.
func parseYAML(file string, data []byte) ([]Service, error) {
	p := &parser{fieldErrs: fieldErrs{file: file}}
	svcs := p.parse(data)
	if err := p.err(); err != nil {
		return nil, err
	}
	return svcs, nil
}

// fieldErrs collects the errors of one file.
type fieldErrs struct {
	file string
	errs []error
}

func (e *fieldErrs) add(line int, field, format string, args ...any) {
	e.errs = append(e.errs, &FieldError{File: e.file, Line: line, Field: field, Msg: fmt.Sprintf(format, args...)})
}

// err joins the first maxErrorsShown errors, nil if there are none.
func (e *fieldErrs) err() error {
	errs := e.errs
	if len(errs) > maxErrorsShown {
		n := len(errs) - maxErrorsShown
		errs = append(errs[:maxErrorsShown:maxErrorsShown], fmt.Errorf("%s: and %d more errors", e.file, n))
	}
	return errors.Join(errs...)
}

// Fields of the services file, in the order of messages.
var (
	topFields     = []string{"services"}
	serviceFields = []string{"name", "vip", "port", "protocol", "backends", "sessionAffinity"}
	backendFields = []string{"address", "port", "weight"}
)

type parser struct {
	fieldErrs
}

func (p *parser) fail(n *yaml.Node, field, format string, args ...any) {
	line := 0
	if n != nil {
		line = n.Line
	}
	p.add(line, field, format, args...)
}

func (p *parser) parse(data []byte) []Service {
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if err.Error() == "EOF" {
			p.fail(nil, "", "empty file: want a mapping with key services")
			return nil
		}
		p.fail(nil, "", "not YAML or JSON: %v", err)
		return nil
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		p.fail(&extra, "", "more than one YAML document")
		return nil
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	fields := p.mapping(root, "", topFields...)
	if fields == nil {
		return nil
	}
	list, ok := fields["services"]
	if !ok {
		p.fail(root, "services", "missing")
		return nil
	}
	if list.Kind == yaml.ScalarNode && list.Tag == "!!null" {
		return []Service{} // "services:" with nothing: no services
	}
	if list.Kind != yaml.SequenceNode {
		p.fail(list, "services", "want a list")
		return nil
	}
	var (
		out    []Service
		names  = map[string]int{}
		keys   = map[Key]int{}
		failed = len(p.errs)
	)
	for i, n := range list.Content {
		s, ok := p.service(n, fmt.Sprintf("services[%d]", i))
		if !ok {
			continue
		}
		path := fmt.Sprintf("services[%d]", i)
		if prev, dup := names[s.Name]; dup {
			p.fail(n, path+".name", "%q already used on line %d", s.Name, prev)
		}
		names[s.Name] = s.Line
		if prev, dup := keys[s.Key()]; dup {
			p.fail(n, path, "%s %s already served by the service on line %d", s.Protocol, s.VIP, prev)
		}
		keys[s.Key()] = s.Line
		out = append(out, s)
	}
	if len(p.errs) > failed {
		return nil
	}
	if out == nil {
		out = []Service{}
	}
	return out
}

// mapping returns the keys of a mapping node, reporting keys not in
// allowed and duplicate keys.
func (p *parser) mapping(n *yaml.Node, path string, allowed ...string) map[string]*yaml.Node {
	if n.Kind != yaml.MappingNode {
		p.fail(n, path, "want a mapping with keys %s", strings.Join(allowed, ", "))
		return nil
	}
	out := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		field := join(path, k.Value)
		switch {
		case k.Kind != yaml.ScalarNode:
			p.fail(k, path, "keys must be strings")
		case !slices.Contains(allowed, k.Value):
			p.fail(k, field, "unknown field; accepted: %s", strings.Join(allowed, ", "))
		case out[k.Value] != nil:
			p.fail(k, field, "given twice")
		default:
			out[k.Value] = v
		}
	}
	return out
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

func (p *parser) service(n *yaml.Node, path string) (Service, bool) {
	before := len(p.errs)
	f := p.mapping(n, path, serviceFields...)
	if f == nil {
		return Service{}, false
	}
	s := Service{Line: n.Line, Protocol: TCP}
	if v, ok := p.required(n, f, path, "name"); ok {
		if name, ok := p.str(v, path+".name"); ok {
			switch {
			case len(name) > maxNameLen:
				p.fail(v, path+".name", "longer than %d characters", maxNameLen)
			case !validName(name):
				p.fail(v, path+".name", "%q: use letters, digits and _.:/- (starting with a letter or digit)", name)
			default:
				s.Name = name
			}
		}
	}
	var vip netip.Addr
	if v, ok := p.required(n, f, path, "vip"); ok {
		if a, ok := p.addr(v, path+".vip"); ok {
			vip = a
		}
	}
	var port uint16
	if v, ok := p.required(n, f, path, "port"); ok {
		port, _ = p.port(v, path+".port")
	}
	s.VIP = netip.AddrPortFrom(vip, port)
	if v, ok := f["protocol"]; ok {
		if proto, ok := p.str(v, path+".protocol"); ok {
			if pr, ok := parseProtocol(proto); ok {
				s.Protocol = pr
			} else {
				p.fail(v, path+".protocol", "%q: want tcp or udp", proto)
			}
		}
	}
	if v, ok := f["sessionAffinity"]; ok {
		s.Affinity, _ = p.affinity(v, path+".sessionAffinity")
	}
	if v, ok := f["backends"]; ok && !(v.Kind == yaml.ScalarNode && v.Tag == "!!null") {
		if v.Kind != yaml.SequenceNode {
			p.fail(v, path+".backends", "want a list")
		} else {
			seen := map[netip.AddrPort]int{}
			for i, bn := range v.Content {
				bpath := fmt.Sprintf("%s.backends[%d]", path, i)
				b, ok := p.backend(bn, bpath)
				if !ok {
					continue
				}
				if vip.IsValid() && b.Addr.Addr().Is4() != vip.Is4() {
					p.fail(bn, bpath+".address", "%s is not of the VIP's address family", b.Addr.Addr())
					continue
				}
				if prev, dup := seen[b.Addr]; dup {
					p.fail(bn, bpath, "%s already listed on line %d", b.Addr, prev)
					continue
				}
				seen[b.Addr] = bn.Line
				s.Backends = append(s.Backends, b)
			}
		}
	}
	return s, len(p.errs) == before
}

// Session affinity timeouts, as Kubernetes validates and defaults them.
const (
	DefaultAffinityTimeout = 10800 * time.Second
	maxAffinitySeconds     = 86400
)

// affinity parses {clientIP: {timeoutSeconds: N}}; timeoutSeconds may be
// left out for the default.
func (p *parser) affinity(n *yaml.Node, path string) (time.Duration, bool) {
	f := p.mapping(n, path, "clientIP")
	if f == nil {
		return 0, false
	}
	c, ok := p.required(n, f, path, "clientIP")
	if !ok {
		return 0, false
	}
	path += ".clientIP"
	if c.Kind == yaml.ScalarNode && c.Tag == "!!null" {
		return DefaultAffinityTimeout, true
	}
	cf := p.mapping(c, path, "timeoutSeconds")
	if cf == nil {
		return 0, false
	}
	v, ok := cf["timeoutSeconds"]
	if !ok {
		return DefaultAffinityTimeout, true
	}
	sec, ok := p.uint(v, path+".timeoutSeconds", 1, maxAffinitySeconds)
	return time.Duration(sec) * time.Second, ok
}

func (p *parser) backend(n *yaml.Node, path string) (Backend, bool) {
	before := len(p.errs)
	f := p.mapping(n, path, backendFields...)
	if f == nil {
		return Backend{}, false
	}
	var (
		addr netip.Addr
		port uint16
		b    = Backend{Weight: 1}
	)
	if v, ok := p.required(n, f, path, "address"); ok {
		addr, _ = p.addr(v, path+".address")
	}
	if v, ok := p.required(n, f, path, "port"); ok {
		port, _ = p.port(v, path+".port")
	}
	if v, ok := f["weight"]; ok {
		if w, ok := p.uint(v, path+".weight", 1, MaxWeight); ok {
			b.Weight = uint32(w)
		}
	}
	b.Addr = netip.AddrPortFrom(addr, port)
	return b, len(p.errs) == before
}

func (p *parser) required(parent *yaml.Node, f map[string]*yaml.Node, path, key string) (*yaml.Node, bool) {
	v, ok := f[key]
	if !ok {
		p.fail(parent, join(path, key), "missing")
	}
	return v, ok
}

func (p *parser) str(n *yaml.Node, field string) (string, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!str" || n.Value == "" {
		p.fail(n, field, "want a non-empty string")
		return "", false
	}
	return n.Value, true
}

func (p *parser) uint(n *yaml.Node, field string, lo, hi uint64) (uint64, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
		p.fail(n, field, "want a number %d..%d", lo, hi)
		return 0, false
	}
	v, err := strconv.ParseUint(n.Value, 10, 64)
	if err != nil || v < lo || v > hi {
		p.fail(n, field, "%s is out of range %d..%d", n.Value, lo, hi)
		return 0, false
	}
	return v, true
}

func (p *parser) port(n *yaml.Node, field string) (uint16, bool) {
	v, ok := p.uint(n, field, 1, 65535)
	return uint16(v), ok
}

func (p *parser) addr(n *yaml.Node, field string) (netip.Addr, bool) {
	s, ok := p.str(n, field)
	if !ok {
		return netip.Addr{}, false
	}
	a, msg := parseAddr(s)
	if msg != "" {
		p.fail(n, field, "%s", msg)
		return netip.Addr{}, false
	}
	return a, true
}

// Marshal renders services as JSON that Parse reads back (benchmarks and
// tests write services files with it).
func Marshal(svcs []Service) ([]byte, error) {
	type backend struct {
		Address string `json:"address"`
		Port    uint16 `json:"port"`
		Weight  uint32 `json:"weight,omitempty"`
	}
	type clientIP struct {
		TimeoutSeconds int64 `json:"timeoutSeconds"`
	}
	type affinity struct {
		ClientIP clientIP `json:"clientIP"`
	}
	type service struct {
		Name     string    `json:"name"`
		VIP      string    `json:"vip"`
		Port     uint16    `json:"port"`
		Protocol string    `json:"protocol"`
		Backends []backend `json:"backends"`
		Affinity *affinity `json:"sessionAffinity,omitempty"`
	}
	out := struct {
		Services []service `json:"services"`
	}{Services: make([]service, 0, len(svcs))}
	for _, s := range svcs {
		js := service{Name: s.Name, VIP: s.VIP.Addr().String(), Port: s.VIP.Port(), Protocol: s.Protocol.String(), Backends: []backend{}}
		if s.Affinity > 0 {
			js.Affinity = &affinity{ClientIP: clientIP{TimeoutSeconds: int64(affinitySeconds(s.Affinity))}}
		}
		for _, b := range s.Backends {
			w := b.Weight
			if w == 1 {
				w = 0
			}
			js.Backends = append(js.Backends, backend{Address: b.Addr.Addr().String(), Port: b.Addr.Port(), Weight: w})
		}
		out.Services = append(out.Services, js)
	}
	return json.MarshalIndent(out, "", "  ")
}
