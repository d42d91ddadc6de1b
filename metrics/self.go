package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Self holds ktel's own instruments: values that live in the daemon, not
// in BPF maps.
type Self struct {
	ProbeUp *prometheus.GaugeVec
}

// NewRegistry returns a registry with the Go and process collectors,
// ktel_build_info and ktel_probe_up registered.
func NewRegistry(version, revision, goVersion string) (*prometheus.Registry, *Self) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), NewProcessCollector())
	// Not client_golang's version collector: it adds the labels branch,
	// goos, goarch and tags, and another help text.
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "ktel_build_info",
		Help:        "Version of the running ktel; the value is always 1.",
		ConstLabels: prometheus.Labels{"version": version, "revision": revision, "goversion": goVersion},
	})
	info.Set(1)
	self := &Self{ProbeUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "ktel_probe_up",
		Help: "Whether a probe is loaded and attached (1) or could not be (0).",
	}, []string{"probe"})}
	reg.MustRegister(info, self.ProbeUp)
	return reg, self
}
