package lb

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	svcs, err := Parse("s.yaml", []byte(`
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - address: 10.0.0.2
        port: 8080
      - {address: 10.0.0.3, port: 8080, weight: 3}
  - name: dns
    vip: fd00::53
    port: 53
    protocol: UDP
    backends: []
  - name: idle
    vip: 10.96.0.11
    port: 443
`))
	if err != nil {
		t.Fatal(err)
	}
	want := []Service{
		{Name: "web", VIP: netip.MustParseAddrPort("10.96.0.10:80"), Protocol: TCP, Line: 3, Backends: []Backend{
			{Addr: netip.MustParseAddrPort("10.0.0.2:8080"), Weight: 1},
			{Addr: netip.MustParseAddrPort("10.0.0.3:8080"), Weight: 3},
		}},
		{Name: "dns", VIP: netip.MustParseAddrPort("[fd00::53]:53"), Protocol: UDP, Line: 10},
		{Name: "idle", VIP: netip.MustParseAddrPort("10.96.0.11:443"), Protocol: TCP, Line: 15},
	}
	if !reflect.DeepEqual(svcs, want) {
		t.Errorf("got  %+v\nwant %+v", svcs, want)
	}

	// The same as JSON.
	js, err := Marshal(svcs)
	if err != nil {
		t.Fatal(err)
	}
	again, err := Parse("s.json", js)
	if err != nil {
		t.Fatalf("%v\n%s", err, js)
	}
	for i := range again {
		again[i].Line = want[i].Line
	}
	if !reflect.DeepEqual(again, want) {
		t.Errorf("JSON round trip: got %+v", again)
	}
}

func TestParseErrors(t *testing.T) {
	head := "services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n"
	for _, tc := range []struct {
		name, file, want string
	}{
		{"empty", "", "empty file"},
		{"not yaml", "services: [", "not YAML or JSON"},
		{"no services key", "other: 1\n", "s.yaml:1: other: unknown field"},
		{"services not a list", "services: 3\n", "s.yaml:1: services: want a list"},
		{"missing name", "services:\n  - vip: 10.96.0.10\n    port: 80\n", "s.yaml:2: services[0].name: missing"},
		{"bad name", strings.Replace(head, "web", "'we b'", 1), "s.yaml:2: services[0].name: \"we b\""},
		{"numeric name", strings.Replace(head, "web", "42", 1), "services[0].name: want a non-empty string"},
		{"bad vip", strings.Replace(head, "10.96.0.10", "10.96.0.300", 1), "s.yaml:3: services[0].vip: \"10.96.0.300\" is not an IPv4 or IPv6 address"},
		{"unspecified vip", strings.Replace(head, "10.96.0.10", "0.0.0.0", 1), "services[0].vip: \"0.0.0.0\" is not a unicast address"},
		{"mapped vip", strings.Replace(head, "10.96.0.10", "'::ffff:10.0.0.1'", 1), "write IPv4 addresses in dotted form"},
		{"port range", strings.Replace(head, "80", "70000", 1), "s.yaml:4: services[0].port: 70000 is out of range 1..65535"},
		{"port zero", strings.Replace(head, "80", "0", 1), "services[0].port: 0 is out of range"},
		{"port string", strings.Replace(head, "80", "http", 1), "services[0].port: want a number 1..65535"},
		{"protocol", head + "    protocol: sctp\n", "s.yaml:5: services[0].protocol: \"sctp\": want tcp or udp"},
		{"unknown field", head + "    backend: []\n", "s.yaml:5: services[0].backend: unknown field"},
		{"twice", head + "    port: 81\n", "s.yaml:5: services[0].port: given twice"},
		{"backends not a list", head + "    backends: 3\n", "services[0].backends: want a list"},
		{"backend port", head + "    backends:\n      - {address: 10.0.0.1, port: 99999}\n", "s.yaml:6: services[0].backends[0].port: 99999 is out of range"},
		{"backend address", head + "    backends:\n      - {address: nowhere, port: 1}\n", "services[0].backends[0].address: \"nowhere\""},
		{"backend missing port", head + "    backends:\n      - address: 10.0.0.1\n", "s.yaml:6: services[0].backends[0].port: missing"},
		{"weight", head + "    backends:\n      - {address: 10.0.0.1, port: 1, weight: 0}\n", "services[0].backends[0].weight: 0 is out of range 1..100"},
		{"family", head + "    backends:\n      - {address: '::1', port: 1}\n", "services[0].backends[0].address: ::1 is not of the VIP's address family"},
		{"duplicate backend", head + "    backends:\n      - {address: 10.0.0.1, port: 1}\n      - {address: 10.0.0.1, port: 1}\n", "s.yaml:7: services[0].backends[1]: 10.0.0.1:1 already listed on line 6"},
		{"duplicate name", head + strings.Replace(head, "services:\n", "", 1), "s.yaml:5: services[1].name: \"web\" already used on line 2"},
		{"duplicate vip", head + "  - name: other\n    vip: 10.96.0.10\n    port: 80\n", "s.yaml:5: services[1]: tcp 10.96.0.10:80 already served by the service on line 2"},
		{"two documents", head + "---\nservices: []\n", "more than one YAML document"},
		{"json", `{"services": [{"name": "a", "vip": "10.0.0.1", "port": "80"}]}`, "s.yaml:1: services[0].port: want a number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("s.yaml", []byte(tc.file))
			if err == nil {
				t.Fatalf("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\nwant it to contain %q", err, tc.want)
			}
		})
	}
}

// Every error is reported, not only the first.
func TestParseAllErrors(t *testing.T) {
	_, err := Parse("s.yaml", []byte("services:\n  - name: a\n    vip: x\n    port: 0\n  - name: b\n    vip: 10.0.0.1\n    port: 1\n    protocol: icmp\n"))
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{"services[0].vip", "services[0].port", "services[1].protocol"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q lacks %s", err, want)
		}
	}
}

func TestParseEmpty(t *testing.T) {
	for _, f := range []string{"services: []\n", "services:\n", `{"services": []}`} {
		svcs, err := Parse("", []byte(f))
		if err != nil || svcs == nil || len(svcs) != 0 {
			t.Errorf("%q: %v %v", f, svcs, err)
		}
	}
}

// sampleServices covers every field: IPv4 and IPv6, TCP and UDP, weights,
// no backends, many backends (a map checks their uniqueness).
func sampleServices() []Service {
	ap := netip.MustParseAddrPort
	svcs := []Service{
		{Name: "web", VIP: ap("10.96.0.10:80"), Protocol: TCP, Backends: []Backend{
			{Addr: ap("10.0.0.2:8080"), Weight: 1}, {Addr: ap("10.0.0.3:8080"), Weight: 100}}},
		{Name: "dns.kube-system/udp:53", VIP: ap("[fd00::a]:53"), Protocol: UDP, Backends: []Backend{
			{Addr: ap("[fd00::1]:5353"), Weight: 3}}},
		{Name: "empty", VIP: ap("10.96.0.11:443"), Protocol: TCP},
		{Name: "big", VIP: ap("10.96.0.12:443"), Protocol: TCP},
	}
	for i := range 40 {
		svcs[3].Backends = append(svcs[3].Backends, Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(i)}), 443), Weight: 1})
	}
	return svcs
}

// The fast path reads JSON as programs write it (indented with spaces or
// tabs, compact, CRLF), and reads it as the YAML reader does, lines
// included; files it declines get the YAML reader's messages.
func TestParseJSON(t *testing.T) {
	want := sampleServices()
	indented, err := Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(indented, &v); err != nil {
		t.Fatal(err)
	}
	compact, _ := json.Marshal(v)
	tabs, _ := json.MarshalIndent(v, "", "\t")
	crlf := bytes.ReplaceAll(indented, []byte("\n"), []byte("\r\n"))
	cr := bytes.ReplaceAll(indented, []byte("\n"), []byte("\r"))
	for name, data := range map[string][]byte{"indented": indented, "compact": compact, "tabs": tabs, "crlf": crlf, "cr": cr} {
		got, ok := decodeServices(data)
		if !ok {
			t.Errorf("%s: fast path declined", name)
			continue
		}
		ref, err := parseYAML("f", data)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !reflect.DeepEqual(got, ref) {
			t.Errorf("%s: fast path read %+v\nYAML reader read %+v", name, got, ref)
		}
		for i := range got {
			got[i].Line = 0
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: read %+v, want %+v", name, got, want)
		}
	}

	// Errors name the line and the field.
	const file = `{"services": [
  {"name": "a", "vip": "1.1.1.1", "port": 0},
  {"name": "b", "vip": "1.1.1.2", "port": 1, "extra": 1},
  {"name": "c", "vip": "1.1.1.3", "port": 1,
   "backends": [{"address": "fd00::1", "port": 1},
                {"address": "1.1.1.9", "port": 1, "weight": 1.5},
                {"port": 2}]},
  {"name": "a", "vip": "1.1.1.1", "port": 1, "Port": 2},
  {"name": "e", "vip": "1.1.1.5", "port": 1, "port": 2},
  {"name": "f", "vip": "1.1.1.6", "port": 1, "backends": [
    {"address": "1.1.1.7", "port": 1},
    {"address": "1.1.1.7", "port": 1}]},
  {"name": "g", "vip": "1.1.1.6", "port": 1, "protocol": "sctp"},
  {"vip": "1.1.1.8", "port": 1e1},
  {"name": "h", "vip": "1.1.1.8", "port": 2}, 
  {"name": "h", "vip": "1.1.1.8", "port": 2}
]}`
	_, err = Parse("f", []byte(file))
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		"f:2: services[0].port: 0 is out of range 1..65535",
		"f:3: services[1].extra: unknown field; accepted: name, vip, port, protocol, backends",
		"f:5: services[2].backends[0].address: fd00::1 is not of the VIP's address family",
		"f:6: services[2].backends[1].weight: want a number 1..100",
		"f:7: services[2].backends[2].address: missing",
		"f:8: services[3].Port: unknown field",
		"f:9: services[4].port: given twice",
		"f:12: services[5].backends[1]: 1.1.1.7:1 already listed on line 11",
		"f:13: services[6].protocol: \"sctp\": want tcp or udp",
		"f:14: services[7].name: missing",
		"f:14: services[7].port: want a number 1..65535",
		"f:16: services[9].name: \"h\" already used on line 15",
		"f:16: services[9]: tcp 1.1.1.8:2 already served by the service on line 15",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}

	// What encoding/json would read otherwise than the YAML reader, the
	// fast path declines.
	for _, f := range []string{
		`{"services": [{"Name": "a", "vip": "1.1.1.1", "port": 1}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "port": 1}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "backends": [{"address": "1.1.1.2", "port": 1}], "backends": []}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "back\u0065nds": [], "backends": []}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "backends": [{"addreſs": "1.1.1.2", "port": 1}]}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "protocol": null}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": "1"}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1}], "other": 1}`,
	} {
		if svcs, ok := decodeServices([]byte(f)); ok {
			t.Errorf("fast path read %s as %+v", f, svcs)
		}
		if _, err := Parse("f", []byte(f)); err == nil || !strings.Contains(err.Error(), "f:1: ") {
			t.Errorf("%s: error %v, want one naming line and field", f, err)
		}
	}

	// Valid files it declines, the YAML reader reads.
	for _, f := range []string{
		`{"services": [{"name": "a\u0041", "vip": "1.1.1.1", "port": 1}]}`,
		`{"services": null}`,
		"{services: []}",
		"{\"services\": [] # none\n}",
	} {
		if svcs, ok := decodeServices([]byte(f)); ok {
			t.Errorf("fast path read %s as %+v", f, svcs)
		}
		if _, err := Parse("f", []byte(f)); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

func TestParseSessionAffinity(t *testing.T) {
	svcs, err := Parse("s.yaml", []byte(`
services:
  - {name: a, vip: 10.96.0.10, port: 53, protocol: udp, sessionAffinity: {clientIP: {timeoutSeconds: 30}}}
  - {name: b, vip: 10.96.0.11, port: 80, sessionAffinity: {clientIP: {}}}
  - {name: c, vip: 10.96.0.12, port: 80, sessionAffinity: {clientIP: }}
  - {name: d, vip: 10.96.0.13, port: 80}
`))
	if err != nil {
		t.Fatal(err)
	}
	want := []time.Duration{30 * time.Second, DefaultAffinityTimeout, DefaultAffinityTimeout, 0}
	for i, s := range svcs {
		if s.Affinity != want[i] {
			t.Errorf("%s: affinity %v, want %v", s.Name, s.Affinity, want[i])
		}
	}
	js, err := Marshal(svcs)
	if err != nil {
		t.Fatal(err)
	}
	again, err := Parse("s.json", js)
	if err != nil {
		t.Fatalf("%v\n%s", err, js)
	}
	for i, s := range again {
		if s.Affinity != want[i] {
			t.Errorf("JSON round trip %s: affinity %v, want %v", s.Name, s.Affinity, want[i])
		}
	}

	for _, bad := range []string{
		`sessionAffinity: {clientIP: {timeoutSeconds: 0}}`,
		`sessionAffinity: {clientIP: {timeoutSeconds: 86401}}`,
		`sessionAffinity: {clientIP: {timeout: 5}}`,
		`sessionAffinity: {}`,
		`sessionAffinity: ClientIP`,
	} {
		_, err := Parse("s.yaml", []byte("services:\n  - {name: a, vip: 10.96.0.10, port: 53, "+bad+"}\n"))
		if err == nil || !strings.Contains(err.Error(), "services[0].sessionAffinity") {
			t.Errorf("%s: error %v, want one naming services[0].sessionAffinity", bad, err)
		}
	}
}
