package metrics

import (
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
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
	// Timeout answers 503 to a scrape that takes longer; the scrape keeps
	// its in-flight slot until its gathering ends. 0: none.
	Timeout time.Duration
}

// Handler serves /metrics from g with promhttp: format negotiation
// (OpenMetrics for exemplars, protobuf for native histograms), its
// compression (gzip), the name[] filter, and, on a gathering error, what
// was gathered.
func Handler(g prometheus.TransactionalGatherer, opts HandlerOpts) http.Handler {
	var errLog promhttp.Logger
	if opts.Log != nil {
		errLog = slog.NewLogLogger(opts.Log.Handler(), slog.LevelError)
	}
	return promhttp.HandlerForTransactional(g, promhttp.HandlerOpts{
		ErrorLog:            errLog,
		ErrorHandling:       promhttp.ContinueOnError,
		Registry:            opts.Registry,
		MaxRequestsInFlight: opts.MaxRequestsInFlight,
		Timeout:             opts.Timeout,
		EnableOpenMetrics:   true,
	})
}
