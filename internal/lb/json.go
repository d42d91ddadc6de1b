package lb

import (
	"bytes"
	"encoding/json"
	"io"
	"net/netip"
	"strconv"
)

// decodeServices reads a valid services file that is one JSON object
// with encoding/json, one decoder call per service into a struct: for
// 10,000 services ~55 ms of CPU against ~280 ms for the YAML reader, which
// builds yaml.v3's node tree first; a reload must stay within 150 ms
// (BENCHMARKS-lb.md). ok is false for anything else, and then Parse reads
// the file with the YAML reader, which reports every problem with its line
// and field; errors are rare, their speed does not matter. What this
// accepts, the YAML reader reads identically (FuzzParseJSON checks it).
//
// It declines, besides invalid files, valid ones it cannot read exactly as
// the YAML reader does or that are not worth the code: a service with an
// escape (\) anywhere, and "services": null.
//
// Decoding into a struct, encoding/json takes a key that differs from a
// field's name only in case (or by a Unicode folding) for that field, and
// the last of a repeated key, where the YAML reader rejects both. The
// ...Case fields catch the first: the decoder gives a folded key to the
// first field declared with that folding. jsonString and jsonNumber count
// the second; a repeated "backends" is found in the bytes of the service.
func decodeServices(data []byte) (svcs []Service, ok bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	for _, want := range []json.Token{json.Delim('{'), "services", json.Delim('[')} {
		if t, err := dec.Token(); err != nil || t != want {
			return nil, false
		}
	}
	var (
		names = map[string]struct{}{}
		keys  = map[Key]struct{}{}
		lines = lineCounter{data: data, line: 1}
		js    jsonService
	)
	svcs = []Service{}
	for dec.More() {
		start := int(dec.InputOffset())
		// One jsonService for all, for fewer allocations; the decoder
		// reuses the elements of a slice without zeroing them.
		bs := js.Backends[:cap(js.Backends)]
		clear(bs)
		js = jsonService{Backends: bs[:0]}
		if err := dec.Decode(&js); err != nil {
			return nil, false
		}
		// The service starts after the ',' that dec.More skipped.
		start = skipSpace(data, start)
		if start < len(data) && data[start] == ',' {
			start = skipSpace(data, start+1)
		}
		raw := data[start:dec.InputOffset()]
		if bytes.IndexByte(raw, '\\') >= 0 || bytes.Count(raw, []byte(`"backends"`)) > 1 {
			return nil, false
		}
		s, ok := js.service(lines.at(start))
		if !ok {
			return nil, false
		}
		if _, dup := names[s.Name]; dup {
			return nil, false
		}
		if _, dup := keys[s.Key()]; dup {
			return nil, false
		}
		names[s.Name], keys[s.Key()] = struct{}{}, struct{}{}
		svcs = append(svcs, s)
	}
	for _, want := range []json.Token{json.Delim(']'), json.Delim('}')} {
		if t, err := dec.Token(); err != nil || t != want {
			return nil, false
		}
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, false
	}
	return svcs, true
}

// jsonService is a service as decodeServices decodes it.
type jsonService struct {
	// Keys that differ only in case: none in a valid file.
	NameCase     json.RawMessage `json:"NAME"`
	VIPCase      json.RawMessage `json:"VIP"`
	PortCase     json.RawMessage `json:"PORT"`
	ProtocolCase json.RawMessage `json:"PROTOCOL"`
	BackendsCase json.RawMessage `json:"BACKENDS"`

	Name     jsonString    `json:"name"`
	VIP      jsonString    `json:"vip"`
	Port     jsonNumber    `json:"port"`
	Protocol jsonString    `json:"protocol"`
	Backends []jsonBackend `json:"backends"`
}

type jsonBackend struct {
	// Keys that differ only in case: none in a valid file.
	AddressCase json.RawMessage `json:"ADDRESS"`
	PortCase    json.RawMessage `json:"PORT"`
	WeightCase  json.RawMessage `json:"WEIGHT"`

	Address jsonString `json:"address"`
	Port    jsonNumber `json:"port"`
	Weight  jsonNumber `json:"weight"`
}

// jsonString is a string value and how many times its key was given; ok
// is false if the (last) value was not a string.
type jsonString struct {
	s     string
	ok    bool
	given int
}

func (v *jsonString) UnmarshalJSON(b []byte) error {
	v.given++
	// Without escapes, a string is what is between the quotes;
	// decodeServices declines services with escapes.
	v.ok = b[0] == '"' && bytes.IndexByte(b, '\\') < 0
	if v.ok {
		v.s = string(b[1 : len(b)-1])
	}
	return nil
}

// jsonNumber is a value as written, for numbers, and how many times its
// key was given.
type jsonNumber struct {
	s     string
	given int
}

func (v *jsonNumber) UnmarshalJSON(b []byte) error {
	v.given++
	v.s = string(b)
	return nil
}

// uint returns the value if it is an integer in lo..hi, as the YAML
// reader's check.
func (v jsonNumber) uint(lo, hi uint64) (uint64, bool) {
	if !yamlInt(v.s) {
		return 0, false
	}
	u, err := strconv.ParseUint(v.s, 10, 64)
	return u, err == nil && u >= lo && u <= hi
}

func (v jsonString) addr() (netip.Addr, bool) {
	if !v.ok {
		return netip.Addr{}, false
	}
	a, msg := parseAddr(v.s)
	return a, msg == ""
}

// service applies the checks of the YAML reader; ok is false if one fails.
func (js *jsonService) service(line int) (s Service, ok bool) {
	if js.NameCase != nil || js.VIPCase != nil || js.PortCase != nil || js.ProtocolCase != nil || js.BackendsCase != nil ||
		js.Name.given != 1 || js.VIP.given != 1 || js.Port.given != 1 || js.Protocol.given > 1 {
		return Service{}, false
	}
	s = Service{Name: js.Name.s, Protocol: TCP, Line: line}
	if !js.Name.ok || !validName(s.Name) {
		return Service{}, false
	}
	vip, ok := js.VIP.addr()
	if !ok {
		return Service{}, false
	}
	port, ok := js.Port.uint(1, 65535)
	if !ok {
		return Service{}, false
	}
	s.VIP = netip.AddrPortFrom(vip, uint16(port))
	if js.Protocol.given == 1 {
		if !js.Protocol.ok {
			return Service{}, false
		}
		if s.Protocol, ok = parseProtocol(js.Protocol.s); !ok {
			return Service{}, false
		}
	}
	if len(js.Backends) > 0 {
		s.Backends = make([]Backend, 0, len(js.Backends))
	}
	for _, jb := range js.Backends {
		if jb.AddressCase != nil || jb.PortCase != nil || jb.WeightCase != nil ||
			jb.Address.given != 1 || jb.Port.given != 1 || jb.Weight.given > 1 {
			return Service{}, false
		}
		addr, ok := jb.Address.addr()
		if !ok || addr.Is4() != vip.Is4() {
			return Service{}, false
		}
		port, ok := jb.Port.uint(1, 65535)
		if !ok {
			return Service{}, false
		}
		b := Backend{Addr: netip.AddrPortFrom(addr, uint16(port)), Weight: 1}
		if jb.Weight.given == 1 {
			w, ok := jb.Weight.uint(1, MaxWeight)
			if !ok {
				return Service{}, false
			}
			b.Weight = uint32(w)
		}
		s.Backends = append(s.Backends, b)
	}
	if len(s.Backends) > 1 && !uniqueBackends(s.Backends) {
		return Service{}, false
	}
	return s, true
}

// uniqueBackends reports whether no address is listed twice.
func uniqueBackends(bs []Backend) bool {
	if len(bs) <= 8 {
		for i := range bs {
			for j := range i {
				if bs[i].Addr == bs[j].Addr {
					return false
				}
			}
		}
		return true
	}
	seen := make(map[netip.AddrPort]struct{}, len(bs))
	for _, b := range bs {
		if _, dup := seen[b.Addr]; dup {
			return false
		}
		seen[b.Addr] = struct{}{}
	}
	return true
}

// lineCounter counts lines as yaml.v3 does: LF, CRLF and a lone CR each
// end one.
type lineCounter struct {
	data []byte
	off  int // counted up to here
	line int // of off
}

// at returns the line of offset off, which must not be before the last
// one asked for.
func (c *lineCounter) at(off int) int {
	gap := c.data[c.off:off]
	c.line += bytes.Count(gap, []byte{'\n'})
	if bytes.IndexByte(gap, '\r') >= 0 {
		c.line += bytes.Count(gap, []byte{'\r'}) - bytes.Count(gap, []byte("\r\n"))
	}
	c.off = off
	return c.line
}

// skipSpace returns the offset of the first byte from i on that is not
// JSON whitespace.
func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\r' || data[i] == '\n') {
		i++
	}
	return i
}

// yamlInt reports whether the YAML reader takes the JSON number n for an
// integer (yaml.v3 resolves a plain scalar that ParseInt or ParseUint
// accepts to !!int); 1.0, 1e3 and numbers beyond 64 bits are not.
func yamlInt(n string) bool {
	if _, err := strconv.ParseInt(n, 10, 64); err == nil {
		return true
	}
	_, err := strconv.ParseUint(n, 10, 64)
	return err == nil
}
