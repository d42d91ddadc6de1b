package lb

import (
	"net/netip"
)

// parseJSON is Parse's fast path for services files in JSON, the form that
// programs write and the one large files come in. yaml.v3 builds a node
// tree first and takes ~40 ms per 1,000 services; this reads the bytes once
// for exactly the services schema and applies the same checks, ~50 times
// faster.
//
// It is conservative: anything but a valid file in plain JSON (escapes,
// non-ASCII bytes, nulls, unknown or repeated keys, numbers that are not
// plain decimal integers, a value that fails a check) returns ok=false, and
// Parse runs the YAML path, which is the reference and names the line and
// field of every error. FuzzParseJSON checks that whatever this path
// accepts, the YAML path reads identically.
func parseJSON(data []byte) (svcs []Service, ok bool) {
	s := &jsonScanner{data: data, line: 1}
	var (
		names = map[string]struct{}{}
		keys  = map[Key]struct{}{}
		seen  bool
	)
	svcs = []Service{}
	ok = s.object(func(key []byte) bool {
		if string(key) != "services" || seen {
			return false
		}
		seen = true
		return s.array(func() bool {
			svc, ok := s.service()
			if !ok {
				return false
			}
			if _, dup := names[svc.Name]; dup {
				return false
			}
			if _, dup := keys[svc.Key()]; dup {
				return false
			}
			names[svc.Name] = struct{}{}
			keys[svc.Key()] = struct{}{}
			svcs = append(svcs, svc)
			return true
		})
	})
	if s.peek(); !ok || !seen || s.pos != len(s.data) {
		return nil, false
	}
	return svcs, true
}

// jsonScanner reads JSON left to right, counting lines as yaml.v3 does.
type jsonScanner struct {
	data []byte
	pos  int
	line int
}

// peek skips whitespace and returns the next byte, 0 at the end.
func (s *jsonScanner) peek() byte {
	for ; s.pos < len(s.data); s.pos++ {
		switch c := s.data[s.pos]; c {
		case ' ', '\t':
		case '\n':
			s.line++
		case '\r':
			if s.pos+1 == len(s.data) || s.data[s.pos+1] != '\n' {
				return c // a lone CR is a line break for YAML: not handled
			}
		default:
			return c
		}
	}
	return 0
}

// next consumes c.
func (s *jsonScanner) next(c byte) bool {
	if s.peek() != c {
		return false
	}
	s.pos++
	return true
}

// object reads an object, calling field with each key; field reads the
// value.
func (s *jsonScanner) object(field func(key []byte) bool) bool {
	if !s.next('{') {
		return false
	}
	if s.next('}') {
		return true
	}
	for {
		k, ok := s.bytes()
		line := s.line
		// YAML wants a flow key and its colon on one line.
		if !ok || !s.next(':') || s.line != line || !field(k) {
			return false
		}
		if s.next('}') {
			return true
		}
		if !s.next(',') {
			return false
		}
	}
}

// array reads an array, calling elem for each element.
func (s *jsonScanner) array(elem func() bool) bool {
	if !s.next('[') {
		return false
	}
	if s.next(']') {
		return true
	}
	for {
		if !elem() {
			return false
		}
		if s.next(']') {
			return true
		}
		if !s.next(',') {
			return false
		}
	}
}

// bytes reads a string of printable ASCII without escapes.
func (s *jsonScanner) bytes() ([]byte, bool) {
	if !s.next('"') {
		return nil, false
	}
	start := s.pos
	for ; s.pos < len(s.data); s.pos++ {
		switch c := s.data[s.pos]; {
		case c == '"':
			s.pos++
			return s.data[start : s.pos-1], true
		case c < 0x20 || c >= 0x7f || c == '\\':
			return nil, false
		}
	}
	return nil, false
}

// addr reads a string that is a valid VIP or backend address.
func (s *jsonScanner) addr() (netip.Addr, bool) {
	str, ok := s.str()
	if !ok {
		return netip.Addr{}, false
	}
	a, msg := parseAddr(str)
	return a, msg == ""
}

func (s *jsonScanner) str() (string, bool) {
	b, ok := s.bytes()
	return string(b), ok && len(b) > 0
}

// uint reads a decimal integer in lo..hi without sign, fraction, exponent
// or leading zeros.
func (s *jsonScanner) uint(lo, hi uint64) (uint64, bool) {
	c := s.peek()
	if c < '1' || c > '9' {
		return 0, false
	}
	var v uint64
	for n := 0; s.pos < len(s.data) && n < 10; n++ {
		c := s.data[s.pos]
		if c < '0' || c > '9' {
			break
		}
		v = v*10 + uint64(c-'0')
		s.pos++
	}
	if s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ',', '}', ']', ' ', '\t', '\r', '\n':
		default:
			return 0, false // more digits, a fraction or an exponent
		}
	}
	return v, v >= lo && v <= hi
}

// fields reads an object whose keys are among names, each at most once,
// calling value with the key's index; it returns the set of keys read.
func (s *jsonScanner) fields(names []string, value func(i int) bool) (uint, bool) {
	var set uint
	ok := s.object(func(key []byte) bool {
		for i, n := range names {
			if string(key) == n {
				if set&(1<<i) != 0 {
					return false
				}
				set |= 1 << i
				return value(i)
			}
		}
		return false
	})
	return set, ok
}

var (
	serviceFields = []string{"name", "vip", "port", "protocol", "backends"}
	backendFields = []string{"address", "port", "weight"}
)

func (s *jsonScanner) service() (Service, bool) {
	svc := Service{Protocol: TCP}
	if s.peek() == '{' {
		svc.Line = s.line
	}
	var (
		vip  netip.Addr
		port uint64
	)
	set, ok := s.fields(serviceFields, func(i int) bool {
		var ok bool
		switch i {
		case 0:
			if svc.Name, ok = s.str(); ok {
				ok = validName(svc.Name)
			}
		case 1:
			vip, ok = s.addr()
		case 2:
			port, ok = s.uint(1, 65535)
		case 3:
			var p string
			if p, ok = s.str(); ok {
				svc.Protocol, ok = parseProtocol(p)
			}
		case 4:
			var seen map[netip.AddrPort]struct{} // past a few backends
			ok = s.array(func() bool {
				b, ok := s.backend()
				if !ok {
					return false
				}
				if seen == nil && len(svc.Backends) < 8 {
					for _, o := range svc.Backends {
						if o.Addr == b.Addr {
							return false
						}
					}
				} else {
					if seen == nil {
						seen = make(map[netip.AddrPort]struct{}, 2*len(svc.Backends))
						for _, o := range svc.Backends {
							seen[o.Addr] = struct{}{}
						}
					}
					if _, dup := seen[b.Addr]; dup {
						return false
					}
					seen[b.Addr] = struct{}{}
				}
				svc.Backends = append(svc.Backends, b)
				return true
			})
		}
		return ok
	})
	if !ok || set&0b111 != 0b111 {
		return Service{}, false
	}
	for _, b := range svc.Backends {
		if b.Addr.Addr().Is4() != vip.Is4() {
			return Service{}, false
		}
	}
	svc.VIP = netip.AddrPortFrom(vip, uint16(port))
	return svc, true
}

func (s *jsonScanner) backend() (Backend, bool) {
	var (
		addr netip.Addr
		port uint64
		w    uint64 = 1
	)
	set, ok := s.fields(backendFields, func(i int) bool {
		var ok bool
		switch i {
		case 0:
			addr, ok = s.addr()
		case 1:
			port, ok = s.uint(1, 65535)
		case 2:
			w, ok = s.uint(1, MaxWeight)
		}
		return ok
	})
	if !ok || set&0b11 != 0b11 {
		return Backend{}, false
	}
	return Backend{Addr: netip.AddrPortFrom(addr, uint16(port)), Weight: uint32(w)}, true
}
