package lb

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"

	"gopkg.in/yaml.v3"
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

// FuzzParseJSON: what the fast path (decodeServices) accepts, the YAML
// reader reads identically, lines included; and a valid JSON object that
// the YAML reader accepts, the fast path accepts too, unless it declines
// it by design (declinedValid). What the fast path declines, Parse reads
// with the YAML reader, so its messages are the YAML reader's by
// construction. yaml.v3 rejects some valid JSON (a key and its colon on
// different lines): those are not compared.
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
		"{\r\"services\":\r[{\"name\":\"a\",\r\"vip\":\"1.1.1.1\",\"port\":0}]}",
		`{"services": [{"backends": [], "name": "a", "port": 65535, "vip": "1.1.1.1"}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "backends": [{"address": "1.1.1.2", "port": 1}, {"address": "1.1.1.2", "port": 1}]}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1e1}]}`,
		`{"services": [{"name": "a\u0041", "vip": "1.1.1.1", "port": 1}]}`,
		`{"services": [{"name": "a", "Name": "b", "vip": "::1", "port": -0, "port": 2, "backends": {}}, [], null, 3]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1}, {"name": "a", "vip": "1.1.1.1", "port": 1}], "x": {"y": [1]}}`,
		`{"services": null, "services": 3}`,
		`{}`,
		`{"services": null}`,
		`{"services": [{"NAME": "a", "vip": "1.1.1.1", "port": 1}]}`,
		`{"services": [{"name": "a", "NAME": "b", "vip": "1.1.1.1", "port": 1}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "Backends": [], "backends": []}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "backends": [{"address": "1.1.1.2", "port": 1}], "backends": []}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "backends": [{"address": "1.1.1.2", "port": 1, "port": 2}]}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "backends": [{"addreſs": "1.1.1.2", "port": 1}]}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "back\u0065nds": [], "backends": []}]}`,
		`{"services": [{"name": "a", "vip": "1.1.1.1", "port": 1, "protocol": null, "backends": [null]}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if i := skipSpace(data, 0); i == len(data) || data[i] != '{' {
			return
		}
		var doc yaml.Node
		if yaml.Unmarshal(data, &doc) != nil {
			return
		}
		fast, ok := decodeServices(data)
		ref, err := parseYAML("f", data)
		switch {
		case ok && err != nil:
			t.Fatalf("fast path read %+v\nYAML reader: %v\n%q", fast, err, data)
		case ok && !reflect.DeepEqual(fast, ref):
			t.Fatalf("fast path read %+v\nYAML reader read %+v\n%q", fast, ref, data)
		case !ok && err == nil && json.Valid(data) && !declinedValid(data):
			t.Fatalf("fast path declined what the YAML reader read as %+v\n%q", ref, data)
		}
	})
}

// declinedValid reports whether data is of the valid files that
// decodeServices declines by design: with an escape, or "services": null.
func declinedValid(data []byte) bool {
	if bytes.IndexByte(data, '\\') >= 0 {
		return true
	}
	var top struct {
		Services json.RawMessage `json:"services"`
	}
	return json.Unmarshal(data, &top) == nil && string(top.Services) == "null"
}
