package delivery

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/internal/prom"
)

// metrics are the delivery service's Prometheus collectors, shared by its
// sessions (a session holds no collector of its own). They exist (and
// count) whether or not Config.Metrics registers them.
type metrics struct {
	sessions    prometheus.Gauge     // sessions delivering on this node
	lagging     prometheus.Gauge     // sessions re-reading the streams after losing live messages
	fellBehind  prometheus.Counter   // times a session lost live messages and started re-reading
	fromRecent  prometheus.Counter   // messages a re-read took from a group's latest in memory
	delivered   prometheus.Counter   // messages handed to a sink the first time
	redelivered prometheus.Counter   // in-flight messages handed again after AckTimeout
	acks        prometheus.Counter   // messages acked by a device
	liveLag     prometheus.Histogram // a stored message's storage to its arrival at the dispatcher
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		sessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vartalap_delivery_sessions",
			Help: "Delivery sessions (connected devices) on this node.",
		}),
		lagging: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vartalap_delivery_lagging_sessions",
			Help: "Sessions on this node catching up from the streams after live messages overflowed their queue (the node could not keep up); at LaggingHigh or more, group senders are slowed (see Service.Overloaded).",
		}),
		fellBehind: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_delivery_fell_behind_total",
			Help: "Times a session lost live messages (its queue overflowed, or the node's subscription dropped messages) and started re-reading the streams.",
		}),
		fromRecent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_delivery_from_recent_total",
			Help: "Group messages a session that fell behind took from the group's latest messages kept in memory on this node, instead of reading GROUP_LOG.",
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
		liveLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vartalap_delivery_live_lag_seconds",
			Help:    "Time from a message's storage in INBOX or GROUP_LOG to its arrival, republished, at this node's delivery service: the rest of the stream's atomic batch and its fsync, then the hops to the dispatcher. Across nodes it includes the difference between their clocks.",
			Buckets: prom.LatencyBuckets,
		}),
	}
	if err := prom.Register(reg, m.sessions, m.lagging, m.fellBehind, m.fromRecent, m.delivered, m.redelivered, m.acks, m.liveLag); err != nil {
		return nil, err
	}
	return m, nil
}
