package metrics

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

// HandlerOpts configure Handler.
type HandlerOpts struct {
	// Log receives gathering and encoding errors.
	Log *slog.Logger
	// Registry, when set, gets promhttp_metric_handler_errors_total.
	Registry prometheus.Registerer
	// MaxRequestsInFlight bounds concurrent scrapes; more are answered 503
	// at once. 0: no bound.
	MaxRequestsInFlight int
	// Timeout answers 503 to a scrape whose gathering takes longer. 0:
	// none.
	Timeout time.Duration
}

// Handler serves /metrics from g as promhttp.HandlerForTransactional does with
// ContinueOnError and OpenMetrics enabled: same format negotiation,
// headers, name[] filter, in-flight limit and error counter
// (TestHandlerMatchesPromhttp). It differs in how it encodes histogram
// families in the text formats (see encoder), which took most of a ktel
// scrape in promhttp; in compression: gzip at the fastest level (see
// gzipped), for clients that accept it; and in what its timeout bounds
// (see gather).
func Handler(g prometheus.TransactionalGatherer, opts HandlerOpts) http.Handler {
	errCnt := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "promhttp_metric_handler_errors_total",
		Help: "Total number of internal errors encountered by the promhttp metric handler.",
	}, []string{"cause"})
	errCnt.WithLabelValues("gathering")
	errCnt.WithLabelValues("encoding")
	if opts.Registry != nil {
		if err := opts.Registry.Register(errCnt); err != nil {
			if are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); ok {
				errCnt = are.ExistingCollector.(*prometheus.CounterVec)
			} else {
				panic(err)
			}
		}
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var inFlight chan struct{}
	if opts.MaxRequestsInFlight > 0 {
		inFlight = make(chan struct{}, opts.MaxRequestsInFlight)
	}
	formats := expfmt.DefaultOpenMetricsAcceptedFormats()

	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		release := func() {}
		if inFlight != nil {
			select {
			case inFlight <- struct{}{}:
				release = sync.OnceFunc(func() { <-inFlight })
			default:
				http.Error(w, fmt.Sprintf("Limit of concurrent requests reached (%d), try again later.", opts.MaxRequestsInFlight),
					http.StatusServiceUnavailable)
				return
			}
		}
		mfs, done, ok, err := gather(g, opts.Timeout, release)
		if !ok {
			http.Error(w, fmt.Sprintf("Exceeded configured timeout of %v.", opts.Timeout), http.StatusServiceUnavailable)
			return
		}
		defer release()
		if done != nil {
			defer done()
		}
		if err != nil {
			log.Error("error gathering metrics", "err", err)
			errCnt.WithLabelValues("gathering").Inc()
			if len(mfs) == 0 {
				http.Error(w, "An error has occurred while serving metrics:\n\n"+err.Error(), http.StatusInternalServerError)
				return
			}
		}
		format := expfmt.NegotiateAccept(r.Header, formats...)
		w.Header().Add("Vary", "Accept")
		w.Header().Set("Content-Type", string(format))

		var only map[string]bool
		if r.URL != nil {
			if names := r.URL.Query()["name[]"]; len(names) > 0 {
				only = make(map[string]bool, len(names))
				for _, n := range names {
					only[n] = true
				}
			}
		}
		enc := newEncoder(w, format)
		for _, mf := range mfs {
			if only != nil && !only[mf.GetName()] {
				continue
			}
			if err := enc.Encode(mf); err != nil {
				log.Error("error encoding and sending metric family", "err", err)
				errCnt.WithLabelValues("encoding").Inc()
			}
		}
		if err := enc.Close(); err != nil {
			log.Error("error encoding and sending metric family", "err", err)
			errCnt.WithLabelValues("encoding").Inc()
		}
	})
	return gzipped(h)
}

// gather runs g.Gather, waiting at most timeout (if > 0). Only the
// gathering is timed, the one part that waits on the kernel's maps; the
// response is then encoded and compressed as it is sent rather than
// buffered whole, as http.TimeoutHandler would. When gathering times out,
// ok is false, and once it finishes its families are done with and release
// runs, so that a scrape stuck in a collector keeps its in-flight slot.
func gather(g prometheus.TransactionalGatherer, timeout time.Duration, release func()) (mfs []*dto.MetricFamily, done func(), ok bool, err error) {
	if timeout <= 0 {
		mfs, done, err = g.Gather()
		return mfs, done, true, err
	}
	type result struct {
		mfs  []*dto.MetricFamily
		done func()
		err  error
	}
	res := make(chan result, 1)
	go func() {
		mfs, done, err := g.Gather()
		res <- result{mfs, done, err}
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-res:
		return r.mfs, r.done, true, r.err
	case <-t.C:
		go func() {
			r := <-res
			if r.done != nil {
				r.done()
			}
			release()
		}()
		return nil, nil, false, nil
	}
}
