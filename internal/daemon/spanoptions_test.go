package daemon

import (
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/probe"
)

// Outlier events are enabled only when spans are exported and the
// threshold is positive, with the configured rate limit.
func TestSpanOptions(t *testing.T) {
	cfg := &config.Config{SpanRateLimit: 250}
	for _, tc := range []struct {
		name      string
		spans     bool
		threshold time.Duration
		want      probe.SpanOptions
	}{
		{"spans on", true, 10 * time.Millisecond, probe.SpanOptions{Threshold: 10 * time.Millisecond, Rate: 250}},
		{"spans off", false, 10 * time.Millisecond, probe.SpanOptions{}},
		{"threshold zero", true, 0, probe.SpanOptions{}},
		{"threshold negative", true, -time.Second, probe.SpanOptions{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := (env{cfg: cfg, spans: tc.spans}).spanOptions(tc.threshold); got != tc.want {
				t.Errorf("spanOptions(%v) = %+v, want %+v", tc.threshold, got, tc.want)
			}
		})
	}
}
