// Package prom holds the little that the services' Prometheus metrics share:
// registering a service's collectors all or nothing, and the latency buckets.
// Each service package builds and owns its collectors (no global registry,
// no registration at init); cmd/vartalap passes every service one
// Registerer.
package prom

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// LatencyBuckets are the histogram buckets (seconds) for the services'
// durations: 0.5 ms (an fsynced JetStream write on a fast disk) doubling up
// to about 8 s.
var LatencyBuckets = prometheus.ExponentialBuckets(0.0005, 2, 15)

// Register registers cs with reg, all or none: on the first failure (a
// duplicate name, say) it unregisters those it registered and returns the
// error. A nil reg registers nothing: the collectors still count, nobody
// collects them.
func Register(reg prometheus.Registerer, cs ...prometheus.Collector) error {
	if reg == nil {
		return nil
	}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, done := range cs[:i] {
				reg.Unregister(done)
			}
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}
