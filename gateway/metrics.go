package gateway

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/internal/prom"
	"github.com/vartalap/vartalap/schema"
)

// metrics are the gateway's Prometheus collectors. They exist (and count)
// whether or not Config.Metrics registers them. Labels take values from
// fixed sets only: never a user or message id.
type metrics struct {
	conns       prometheus.Gauge       // open WebSockets
	messages    *prometheus.CounterVec // {result}: accepted, rejected
	accepted    prometheus.Counter     // messages{result="accepted"}
	rejected    prometheus.Counter     // messages{result="rejected"}
	rejections  *prometheus.CounterVec // {code}: rejected messages by schema.Code*
	commitMsgs  prometheus.Histogram   // client messages per CHAT_IN batch
	commitTime  prometheus.Histogram   // publish to PubAck of one CHAT_IN batch
	frames      prometheus.Counter     // data frames written to sockets
	writes      prometheus.Counter     // system writes to sockets (frames written together count once)
	backlog     prometheus.Gauge       // CHAT_IN bytes not yet routed, as last read
	paused      prometheus.Counter     // seconds commits waited for the backlog
	fanout      prometheus.Counter     // seconds group messages waited at the fan-out gate
	fanoutLimit prometheus.Gauge       // the fan-out gate's limit (0: open)
}

// rejectionCodes are the codes the gateway answers with, so their series
// exist from the start (at 0).
var rejectionCodes = []string{
	schema.CodeMalformed, schema.CodeMissingID, schema.CodeBadID, schema.CodeMissingTo, schema.CodeBadTo,
	schema.CodeBadChannel, schema.CodeBadType, schema.CodeBadEphemeral, schema.CodeTooLarge,
	schema.CodeRateLimited, schema.CodeUnavailable,
}

// newMetrics builds the collectors and registers them with reg (nil: none).
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		conns: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vartalap_gateway_connections",
			Help: "Open WebSocket connections.",
		}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vartalap_gateway_messages_total",
			Help: "Client messages (WebSocket frames and REST entries; not CLIENT_ACKs or pings) by result: accepted (stored in CHAT_IN or published live) or rejected (answered with an error notice).",
		}, []string{"result"}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vartalap_gateway_rejections_total",
			Help: "Rejected client messages by error code.",
		}, []string{"code"}),
		commitMsgs: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vartalap_gateway_commit_messages",
			Help:    "Client messages per CHAT_IN batch written by the group committer.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000},
		}),
		commitTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vartalap_gateway_commit_seconds",
			Help:    "Time from publishing one CHAT_IN batch to its PubAck.",
			Buckets: prom.LatencyBuckets,
		}),
		backlog: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vartalap_gateway_chat_in_backlog_bytes",
			Help: "CHAT_IN bytes not yet routed (and purged), as last read by the committer; above 8 MiB commits pause.",
		}),
		paused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_gateway_commit_paused_seconds_total",
			Help: "Time the group committer paused because the CHAT_IN backlog was high (back-pressure).",
		}),
		fanout: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_gateway_fanout_paused_seconds_total",
			Help: "Time group messages waited at the fan-out gate before their commit because this node's delivery was falling behind (back-pressure on group senders).",
		}),
		fanoutLimit: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vartalap_gateway_fanout_limit",
			Help: "Group messages per second the fan-out gate admits while this node's delivery falls behind; 0 while it keeps up (no limit).",
		}),
		frames: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_gateway_frames_written_total",
			Help: "Data frames written to WebSockets (messages, acks, error notices, pongs).",
		}),
		writes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_gateway_socket_writes_total",
			Help: "System writes to WebSockets: frames queued together go out in one write, so frames_written_total / socket_writes_total is the coalescing factor.",
		}),
	}
	m.accepted = m.messages.WithLabelValues("accepted")
	m.rejected = m.messages.WithLabelValues("rejected")
	for _, code := range rejectionCodes {
		m.rejections.WithLabelValues(code)
	}
	if err := prom.Register(reg, m.conns, m.messages, m.rejections, m.commitMsgs, m.commitTime, m.frames, m.writes, m.backlog, m.paused, m.fanout, m.fanoutLimit); err != nil {
		return nil, err
	}
	return m, nil
}

// reject counts a client message refused with code.
func (m *metrics) reject(code string) {
	m.rejected.Inc()
	m.rejections.WithLabelValues(code).Inc()
}
