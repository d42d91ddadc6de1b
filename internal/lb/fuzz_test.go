package lb

import (
	"reflect"
	"testing"
)

// FuzzParse: no input makes Parse panic, and what it accepts is valid and
// survives a round trip through Marshal.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"services: []\n",
		"services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    backends:\n      - {address: 10.0.0.1, port: 8080, weight: 2}\n",
		`{"services": [{"name": "dns", "vip": "fd00::53", "port": 53, "protocol": "udp", "backends": [{"address": "fd00::1", "port": 5353}]}]}`,
		"services:\n  - name: x\n    vip: 1.2.3.4\n    port: 70000\n",
		"services: [{name: a, vip: 1.1.1.1, port: 1}, {name: a, vip: 1.1.1.1, port: 1}]",
		"&a [*a]",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		svcs, err := Parse("f.yaml", data)
		if err != nil {
			return
		}
		names := map[string]bool{}
		keys := map[Key]bool{}
		for _, s := range svcs {
			if s.Name == "" || names[s.Name] || keys[s.Key()] || s.VIP.Port() == 0 || !s.VIP.Addr().IsValid() {
				t.Fatalf("invalid service accepted: %+v", s)
			}
			names[s.Name], keys[s.Key()] = true, true
			if s.Protocol != TCP && s.Protocol != UDP {
				t.Fatalf("protocol %d", s.Protocol)
			}
			for _, b := range s.Backends {
				if b.Addr.Port() == 0 || b.Weight < 1 || b.Weight > MaxWeight || b.Addr.Addr().Is4() != s.VIP.Addr().Is4() {
					t.Fatalf("invalid backend accepted: %+v", b)
				}
			}
		}
		js, err := Marshal(svcs)
		if err != nil {
			t.Fatal(err)
		}
		again, err := Parse("f.json", js)
		if err != nil {
			t.Fatalf("round trip: %v\n%s", err, js)
		}
		for i := range again {
			again[i].Line = svcs[i].Line
		}
		if !reflect.DeepEqual(again, svcs) {
			t.Fatalf("round trip: %+v, want %+v", again, svcs)
		}
	})
}

// FuzzParseJSON: whatever the JSON fast path accepts, the YAML parser reads
// identically (line numbers included); the fast path never panics.
func FuzzParseJSON(f *testing.F) {
	for _, svcs := range [][]Service{nil, sampleServices()} {
		js, err := Marshal(svcs)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(js)
	}
	for _, s := range []string{
		`{"services": [{"name": "dns", "vip": "fd00::53", "port": 53, "protocol": "UDP", "backends": [{"address": "fd00::1", "port": 5353, "weight": 7}]}]}`,
		"{\r\n\"services\":\t[{\"name\":\"a\",\"vip\":\"1.1.1.1\",\"port\":1,\"backends\":[]}]}\n",
		`{"services": [{"backends": [], "name": "a", "port": 65535, "vip": "1.1.1.1"}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "backends": [{"address": "1.1.1.2", "port": 1}, {"address": "1.1.1.2", "port": 1}]}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1e1}]}`,
		`{"services": [{"name": "a\u0041", "vip": "1.1.1.1", "port": 1}]}`,
		`{"services": null}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fast, ok := parseJSON(data)
		if !ok {
			return
		}
		ref, err := parseYAML("f", data)
		if err != nil {
			t.Fatalf("fast path accepted what the YAML parser rejects: %v\n%q", err, data)
		}
		if !reflect.DeepEqual(fast, ref) {
			t.Fatalf("fast path read %+v\nYAML parser read %+v\n%q", fast, ref, data)
		}
	})
}
