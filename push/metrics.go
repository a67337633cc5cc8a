package push

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/internal/prom"
)

// metrics are the push service's Prometheus collectors: views of the
// counters behind Stats, so the two never disagree. They exist whether or
// not Config.Metrics registers them.
type metrics struct {
	sent, failed, retries, tokensRemoved prometheus.CounterFunc
}

func newMetrics(reg prometheus.Registerer, s *Service) (*metrics, error) {
	counter := func(name, help string, v *atomic.Uint64) prometheus.CounterFunc {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help},
			func() float64 { return float64(v.Load()) })
	}
	m := &metrics{
		sent: counter("vartalap_push_sent_total",
			"Pushes the provider accepted.", &s.sent),
		failed: counter("vartalap_push_failed_total",
			"Pushes given up: a permanent provider error or retries exhausted (invalid tokens not included).", &s.failed),
		retries: counter("vartalap_push_retries_total",
			"Push send attempts repeated after a retryable provider error.", &s.retried),
		tokensRemoved: counter("vartalap_push_tokens_removed_total",
			"Push tokens removed because the provider reported them invalid or unregistered.", &s.tokensRemoved),
	}
	if err := prom.Register(reg, m.sent, m.failed, m.retries, m.tokensRemoved); err != nil {
		return nil, err
	}
	return m, nil
}
