package lb

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// parseJSON reads a services file that is one JSON object with
// encoding/json. isJSON is false when data does not start with '{' or is
// not one JSON value that encoding/json accepts; Parse then reads it as
// YAML, which accepts more (flow mappings without quotes, comments) and
// names the line of a syntax error.
//
// A valid file is read by decodeServices, the fast path; anything it
// declines by jsonParser, which walks the tokens, applies the YAML
// reader's checks and reports every problem with the YAML reader's
// messages, fields and lines (FuzzParseJSON compares them).
func parseJSON(file string, data []byte) (svcs []Service, isJSON bool, err error) {
	if i := skipSpace(data, 0); i == len(data) || data[i] != '{' {
		return nil, false, nil
	}
	if svcs, ok := decodeServices(data); ok {
		return svcs, true, nil
	}
	return walkJSON(file, data)
}

// walkJSON reads data with jsonParser.
func walkJSON(file string, data []byte) (svcs []Service, isJSON bool, err error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber() // the number as written, to check it as the YAML reader does
	p := &jsonParser{fieldErrs: fieldErrs{file: file}, dec: dec, data: data, lines: lineCounter{data: data, line: 1}}
	svcs, err = p.parse()
	if err != nil {
		return nil, false, nil // not JSON, or not one value: YAML's to read
	}
	if err := p.err(); err != nil {
		return nil, true, err
	}
	return svcs, true, nil
}

// decodeServices is parseJSON's fast path: one decoder call per service,
// into a struct, instead of ~25 per service for jsonParser's tokens. For
// 10,000 services that is ~55 ms of CPU instead of ~110 here, which a
// reload must stay well within (BENCHMARKS-lb.md). ok is false for
// anything but a valid file without escapes or repeated keys; what it
// reads, jsonParser reads identically (FuzzParseJSON checks it).
//
// Decoding into a struct, encoding/json takes a key that differs from a
// field's name only in case (or by a Unicode folding) for that field, and
// the last of a repeated key, where the YAML reader rejects both. The
// ...Case fields catch the first: the decoder gives a folded key to the
// first field declared with that folding. jsonString and jsonNumber count
// the second; a repeated "backends" is found in the bytes of the service.
func decodeServices(data []byte) ([]Service, bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	for _, want := range []json.Token{json.Delim('{'), "services", json.Delim('[')} {
		if t, err := dec.Token(); err != nil || t != want {
			return nil, false
		}
	}
	var (
		svcs  = []Service{}
		names = map[string]struct{}{}
		keys  = map[Key]struct{}{}
		lines = lineCounter{data: data, line: 1}
	)
	var js jsonService
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
	// decodeServices leaves services with escapes to jsonParser.
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

// jsonParser walks the tokens of a services file, counting lines to name
// them in messages.
type jsonParser struct {
	fieldErrs
	dec   *json.Decoder
	data  []byte
	lines lineCounter
}

// errSyntax stops the walk: the decoder rejected the input.
var errSyntax = errors.New("not JSON")

// token is one token of the document and the line it starts on.
type token struct {
	v    json.Token // string, json.Number, bool, nil or json.Delim
	line int
}

func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\r' || data[i] == '\n') {
		i++
	}
	return i
}

func (p *jsonParser) next() (token, error) {
	// InputOffset is the end of the previous token; what follows up to
	// the next is whitespace, a comma or a colon.
	start := int(p.dec.InputOffset())
	v, err := p.dec.Token()
	if err != nil {
		return token{}, errSyntax
	}
	for start < len(p.data) {
		if c := p.data[start]; c != ',' && c != ':' {
			if j := skipSpace(p.data, start); j > start {
				start = j
				continue
			}
			break
		}
		start++
	}
	return token{v, p.lines.at(start)}, nil
}

// skip reads the rest of a value that started with t.
func (p *jsonParser) skip(t token) error {
	if _, ok := t.v.(json.Delim); !ok {
		return nil
	}
	for depth := 1; depth > 0; {
		t, err := p.next()
		if err != nil {
			return err
		}
		switch t.v {
		case json.Delim('{'), json.Delim('['):
			depth++
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
	}
	return nil
}

// object reads the members of an object whose '{' has been read, calling
// value for each key of allowed (by index) with the value's first token;
// value must read the rest of the value. Unknown and repeated keys are
// reported, and their values skipped, as the YAML reader does; path names
// the object in those messages.
func (p *jsonParser) object(path func() string, allowed []string, value func(i int, t token) error) error {
	var seen uint
	for {
		k, err := p.next()
		if err != nil {
			return err
		}
		if k.v == json.Delim('}') {
			return nil
		}
		key := k.v.(string) // the decoder returns nothing else here
		v, err := p.next()
		if err != nil {
			return err
		}
		i := slices.Index(allowed, key)
		switch {
		case i < 0:
			p.add(k.line, join(path(), key), "unknown field; accepted: %s", strings.Join(allowed, ", "))
		case seen&(1<<i) != 0:
			p.add(k.line, join(path(), key), "given twice")
		default:
			seen |= 1 << i
			if err := value(i, v); err != nil {
				return err
			}
			continue
		}
		if err := p.skip(v); err != nil {
			return err
		}
	}
}

// array reads the elements of an array whose '[' has been read.
func (p *jsonParser) array(elem func(i int, t token) error) error {
	for i := 0; ; i++ {
		t, err := p.next()
		if err != nil {
			return err
		}
		if t.v == json.Delim(']') {
			return nil
		}
		if err := elem(i, t); err != nil {
			return err
		}
	}
}

func (p *jsonParser) parse() ([]Service, error) {
	root, err := p.next()
	if err != nil {
		return nil, err
	}
	var (
		out   []Service
		given bool
		names = map[string]int{}
		keys  = map[Key]int{}
	)
	err = p.object(func() string { return "" }, topFields, func(_ int, t token) error {
		given = true
		switch t.v {
		case nil:
			return nil
		case json.Delim('['):
		default:
			p.add(t.line, "services", "want a list")
			return p.skip(t)
		}
		return p.array(func(i int, t token) error {
			s, ok, err := p.service(i, t)
			if err != nil || !ok {
				return err
			}
			if prev, dup := names[s.Name]; dup {
				p.add(s.Line, servicePath(i)+".name", "%q already used on line %d", s.Name, prev)
			}
			names[s.Name] = s.Line
			if prev, dup := keys[s.Key()]; dup {
				p.add(s.Line, servicePath(i), "%s %s already served by the service on line %d", s.Protocol, s.VIP, prev)
			}
			keys[s.Key()] = s.Line
			out = append(out, s)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	if _, err := p.dec.Token(); err != io.EOF {
		return nil, errSyntax // more than one value
	}
	if !given {
		p.add(root.line, "services", "missing")
	}
	if out == nil {
		out = []Service{}
	}
	return out, nil
}

func servicePath(i int) string { return "services[" + strconv.Itoa(i) + "]" }

func backendPath(svc, i int) string {
	return servicePath(svc) + ".backends[" + strconv.Itoa(i) + "]"
}

// walkedBackend is a backend that passed its own checks and the line of its
// object, for the checks that need the whole service.
type walkedBackend struct {
	Backend
	line, i int
}

// service reads the service at index i of the list, which starts with t.
func (p *jsonParser) service(i int, t token) (Service, bool, error) {
	if t.v != json.Delim('{') {
		p.add(t.line, servicePath(i), "want a mapping with keys %s", strings.Join(serviceFields, ", "))
		return Service{}, false, p.skip(t)
	}
	var (
		before   = len(p.errs)
		s        = Service{Line: t.line, Protocol: TCP}
		vip      netip.Addr
		port     uint16
		set      uint
		backends []walkedBackend
		path     = func(f string) string { return servicePath(i) + "." + f }
	)
	err := p.object(func() string { return servicePath(i) }, serviceFields, func(f int, v token) error {
		set |= 1 << f
		switch serviceFields[f] {
		case "name":
			if name, ok := p.str(v, path, "name"); ok {
				switch {
				case len(name) > maxNameLen:
					p.add(v.line, path("name"), "longer than %d characters", maxNameLen)
				case !validName(name):
					p.add(v.line, path("name"), "%q: use letters, digits and _.:/- (starting with a letter or digit)", name)
				default:
					s.Name = name
				}
			}
		case "vip":
			vip, _ = p.addr(v, path, "vip")
		case "port":
			port, _ = p.port(v, path, "port")
		case "protocol":
			proto, ok := p.str(v, path, "protocol")
			if !ok {
				break
			}
			if pr, ok := parseProtocol(proto); ok {
				s.Protocol = pr
			} else {
				p.add(v.line, path("protocol"), "%q: want tcp or udp", proto)
			}
		case "backends":
			switch v.v {
			case nil:
			case json.Delim('['):
				return p.array(func(j int, t token) error {
					b, ok, err := p.backend(i, j, t)
					if ok {
						backends = append(backends, walkedBackend{b, t.line, j})
					}
					return err
				})
			default:
				p.add(v.line, path("backends"), "want a list")
			}
		}
		return p.skip(v)
	})
	if err != nil {
		return Service{}, false, err
	}
	for f, name := range serviceFields[:3] { // name, vip, port are required
		if set&(1<<f) == 0 {
			p.add(t.line, path(name), "missing")
		}
	}
	s.VIP = netip.AddrPortFrom(vip, port)
	s.Backends = p.checkBackends(i, vip, backends)
	return s, len(p.errs) == before, nil
}

// checkBackends applies the checks that need a service's VIP and all its
// backends, and returns those that pass.
func (p *jsonParser) checkBackends(svc int, vip netip.Addr, backends []walkedBackend) []Backend {
	var (
		kept []walkedBackend
		seen map[netip.AddrPort]int // once there are more than a few
	)
	for _, b := range backends {
		if vip.IsValid() && b.Addr.Addr().Is4() != vip.Is4() {
			p.add(b.line, backendPath(svc, b.i)+".address", "%s is not of the VIP's address family", b.Addr.Addr())
			continue
		}
		prev, dup := 0, false
		if seen == nil && len(kept) < 8 {
			for _, o := range kept {
				if o.Addr == b.Addr {
					prev, dup = o.line, true
					break
				}
			}
		} else {
			if seen == nil {
				seen = make(map[netip.AddrPort]int, len(backends))
				for _, o := range kept {
					seen[o.Addr] = o.line
				}
			}
			if prev, dup = seen[b.Addr]; !dup {
				seen[b.Addr] = b.line
			}
		}
		if dup {
			p.add(b.line, backendPath(svc, b.i), "%s already listed on line %d", b.Addr, prev)
			continue
		}
		kept = append(kept, b)
	}
	if len(kept) == 0 {
		return nil
	}
	out := make([]Backend, len(kept))
	for i, b := range kept {
		out[i] = b.Backend
	}
	return out
}

// backend reads backend i of service svc, which starts with t.
func (p *jsonParser) backend(svc, i int, t token) (Backend, bool, error) {
	if t.v != json.Delim('{') {
		p.add(t.line, backendPath(svc, i), "want a mapping with keys %s", strings.Join(backendFields, ", "))
		return Backend{}, false, p.skip(t)
	}
	var (
		before = len(p.errs)
		addr   netip.Addr
		port   uint16
		set    uint
		b      = Backend{Weight: 1}
		path   = func(f string) string { return backendPath(svc, i) + "." + f }
	)
	err := p.object(func() string { return backendPath(svc, i) }, backendFields, func(f int, v token) error {
		set |= 1 << f
		switch backendFields[f] {
		case "address":
			addr, _ = p.addr(v, path, "address")
		case "port":
			port, _ = p.port(v, path, "port")
		case "weight":
			if w, ok := p.uint(v, path, "weight", 1, MaxWeight); ok {
				b.Weight = uint32(w)
			}
		}
		return p.skip(v)
	})
	if err != nil {
		return Backend{}, false, err
	}
	for f, name := range backendFields[:2] { // address and port are required
		if set&(1<<f) == 0 {
			p.add(t.line, path(name), "missing")
		}
	}
	b.Addr = netip.AddrPortFrom(addr, port)
	return b, len(p.errs) == before, nil
}

// The checks of values, with the YAML reader's messages; path(name) names
// the field, built only for a message.

func (p *jsonParser) str(v token, path func(string) string, name string) (string, bool) {
	s, ok := v.v.(string)
	if !ok || s == "" {
		p.add(v.line, path(name), "want a non-empty string")
		return "", false
	}
	return s, true
}

func (p *jsonParser) uint(v token, path func(string) string, name string, lo, hi uint64) (uint64, bool) {
	n, ok := v.v.(json.Number)
	if !ok || !yamlInt(string(n)) {
		p.add(v.line, path(name), "want a number %d..%d", lo, hi)
		return 0, false
	}
	u, err := strconv.ParseUint(string(n), 10, 64)
	if err != nil || u < lo || u > hi {
		p.add(v.line, path(name), "%s is out of range %d..%d", n, lo, hi)
		return 0, false
	}
	return u, true
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

func (p *jsonParser) port(v token, path func(string) string, name string) (uint16, bool) {
	u, ok := p.uint(v, path, name, 1, 65535)
	return uint16(u), ok
}

func (p *jsonParser) addr(v token, path func(string) string, name string) (netip.Addr, bool) {
	s, ok := p.str(v, path, name)
	if !ok {
		return netip.Addr{}, false
	}
	a, msg := parseAddr(s)
	if msg != "" {
		p.add(v.line, path(name), "%s", msg)
		return netip.Addr{}, false
	}
	return a, true
}
