package metrics

import (
	"io"
	"log/slog"
	"math"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// collectorAdapter makes a Collector a prometheus.Collector for testutil.
type collectorAdapter struct{ c Collector }

func (a *collectorAdapter) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(a, ch) }
func (a *collectorAdapter) Collect(ch chan<- prometheus.Metric) {
	if err := a.c.Update(ch); err != nil {
		panic(err)
	}
}

func fmtFloat(e int) string { return strconv.FormatFloat(math.Ldexp(1, e), 'g', -1, 64) }
func itoa(n int) string     { return strconv.Itoa(n) }
func ftoa(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }
