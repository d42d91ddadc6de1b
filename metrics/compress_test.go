package metrics

import (
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestAcceptsGzip(t *testing.T) {
	for v, want := range map[string]bool{
		"":                        false,
		"gzip":                    true,
		"GZIP":                    true,
		"deflate, gzip;q=1.0, *":  true,
		"gzip;q=0":                false,
		"gzip; q=0.000":           false,
		"gzip;q=0.5":              true,
		"identity":                false,
		"*":                       false,
		"x-gzip-but-not":          false,
		"zstd,gzip":               true,
		"br;q=1, gzip ; q=0.001 ": true,
		"gzip;Q=0":                false,
		"gzip;foo=1;q=0":          false,
		"gzip;foo=1":              true,
	} {
		if got := acceptsGzip([]string{v}); got != want {
			t.Errorf("%q: %v, want %v", v, got, want)
		}
	}
}

// Compressed and plain responses carry the same body; errors and status
// codes pass through.
func TestGzipped(t *testing.T) {
	body := strings.Repeat("ktel_syscall_latency_seconds_bucket{le=\"1\"} 3\n", 1000)
	h := gzipped(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/busy" {
			http.Error(w, "too many scrapes", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, body)
	}))
	get := func(path, enc string) *http.Response {
		req := httptest.NewRequest("GET", path, nil)
		if enc != "" {
			req.Header.Set("Accept-Encoding", enc)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		return w.Result()
	}
	read := func(r *http.Response) string {
		var rd io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			z, err := gzip.NewReader(r.Body)
			if err != nil {
				t.Fatal(err)
			}
			rd = z
		}
		b, err := io.ReadAll(rd)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}

	r := get("/", "gzip")
	if r.Header.Get("Content-Encoding") != "gzip" || r.Header.Get("Vary") != "Accept-Encoding" {
		t.Fatalf("headers %v", r.Header)
	}
	if got := read(r); got != body {
		t.Errorf("gzip body differs: %d bytes", len(got))
	}
	r = get("/", "")
	if r.Header.Get("Content-Encoding") != "" || read(r) != body {
		t.Errorf("plain: headers %v", r.Header)
	}
	r = get("/busy", "gzip")
	if r.StatusCode != http.StatusServiceUnavailable || !strings.Contains(read(r), "too many scrapes") {
		t.Errorf("error response: %d", r.StatusCode)
	}
}
