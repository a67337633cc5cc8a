package delivery

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/internal/prom"
)

// metrics are the delivery service's Prometheus collectors, shared by its
// sessions (a session holds no collector of its own). They exist (and
// count) whether or not Config.Metrics registers them.
type metrics struct {
	sessions    prometheus.Gauge   // sessions delivering on this node
	delivered   prometheus.Counter // messages handed to a sink the first time
	redelivered prometheus.Counter // in-flight messages handed again after AckTimeout
	acks        prometheus.Counter // messages acked by a device
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		sessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vartalap_delivery_sessions",
			Help: "Delivery sessions (connected devices) on this node.",
		}),
		delivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_delivery_delivered_total",
			Help: "Messages handed to a connection for the first time in its session (inbox messages and ephemeral ones).",
		}),
		redelivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_delivery_redelivered_total",
			Help: "Inbox messages handed to a connection again because the device did not ack them within the ack timeout.",
		}),
		acks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_delivery_acks_total",
			Help: "Inbox messages acknowledged by a device (CLIENT_ACK over WebSocket or REST).",
		}),
	}
	if err := prom.Register(reg, m.sessions, m.delivered, m.redelivered, m.acks); err != nil {
		return nil, err
	}
	return m, nil
}
