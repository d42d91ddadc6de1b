package metrics

import (
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/klauspost/compress/gzip"
)

// gzipped serves h gzip-compressed to clients that accept it, as Prometheus
// does, at the fastest level. promhttp's own gzip runs compress/gzip at its
// default level: for ktel's ~190 KiB text scrape that took ~6 ms of the
// scrape against ~1.5 ms here, for a body ~18% larger (23 against 19.7 KiB).
func gzipped(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Vary", "Accept-Encoding")
		if !acceptsGzip(r.Header.Values("Accept-Encoding")) {
			h.ServeHTTP(w, r)
			return
		}
		gw := &gzipWriter{ResponseWriter: w}
		defer gw.close()
		h.ServeHTTP(gw, r)
	})
}

// acceptsGzip reports whether an Accept-Encoding header lists gzip with a
// non-zero quality (RFC 9110: the q parameter's name is case-insensitive,
// and it may follow others).
func acceptsGzip(values []string) bool {
	for _, v := range values {
		for c := range strings.SplitSeq(v, ",") {
			coding, params, _ := strings.Cut(strings.TrimSpace(c), ";")
			if !strings.EqualFold(strings.TrimSpace(coding), "gzip") {
				continue
			}
			for p := range strings.SplitSeq(params, ";") {
				name, value, _ := strings.Cut(strings.TrimSpace(p), "=")
				if strings.EqualFold(strings.TrimSpace(name), "q") {
					q, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
					return err == nil && q > 0
				}
			}
			return true
		}
	}
	return false
}

// gzipWriters keeps a few compressors between scrapes. A sync.Pool would
// lose them at every garbage collection, which a scrape's allocations
// trigger every other scrape or so, and a new compressor allocates ~1 MiB
// (its history and tables): more garbage, hence more collections. Kept:
// as many as are usually busy at once; more are made when needed and
// dropped after.
var gzipWriters = make(chan *gzip.Writer, 2)

func getGzipWriter(w io.Writer) *gzip.Writer {
	select {
	case z := <-gzipWriters:
		z.Reset(w)
		return z
	default:
		z, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
		return z
	}
}

func putGzipWriter(z *gzip.Writer) {
	z.Reset(io.Discard) // drop the reference to the response
	select {
	case gzipWriters <- z:
	default:
	}
}

// gzipWriter compresses what is written to it, from the first write or
// WriteHeader on.
type gzipWriter struct {
	http.ResponseWriter
	gz *gzip.Writer
}

func (w *gzipWriter) WriteHeader(code int) {
	if w.gz == nil {
		h := w.Header()
		h.Del("Content-Length")
		h.Set("Content-Encoding", "gzip")
		w.gz = getGzipWriter(w.ResponseWriter)
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *gzipWriter) Write(p []byte) (int, error) {
	if w.gz == nil {
		w.WriteHeader(http.StatusOK)
	}
	return w.gz.Write(p)
}

func (w *gzipWriter) close() {
	if w.gz == nil {
		return
	}
	_ = w.gz.Close()
	putGzipWriter(w.gz)
	w.gz = nil
}
