package router

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/internal/prom"
	"github.com/vartalap/vartalap/schema"
)

// kind classifies a routed client message for vartalap_router_messages_total.
type kind uint8

const (
	kindDirect    kind = iota // to one user's inbox (INDIVIDUAL, OTHER, UNKNOWN channels)
	kindGroup                 // to a group (stored once in GROUP_LOG)
	kindEphemeral             // published live, never stored
	kindClientAck             // a CLIENT_ACK that reached CHAT_IN: dropped
	kindPoison                // undecodable or with a bad sender: dropped
	numKinds
)

var kindNames = [numKinds]string{"direct", "group", "ephemeral", "client_ack", "poison"}

// noticeCodes are the codes of the notices the router stores, so their
// series exist from the start (at 0).
var noticeCodes = []string{schema.CodeBadTo, schema.CodeUnknownGroup, schema.CodeNotMember, schema.CodeInboxFull}

// metrics are the router's Prometheus collectors. They exist (and count)
// whether or not Config.Metrics registers them. Labels take values from
// fixed sets only.
type metrics struct {
	messages *prometheus.CounterVec       // {kind}
	byKind   [numKinds]prometheus.Counter // children of messages
	copies   prometheus.Counter           // stored copies of routed messages
	notices  *prometheus.CounterVec       // {code}: error notices of routed messages
	retries  prometheus.Counter           // CHAT_IN messages nak'd for a retry
	round    prometheus.Histogram         // routing one fetched batch
	wait     prometheus.Histogram         // a CHAT_IN message's storage to its round's start
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vartalap_router_messages_total",
			Help: "Client messages routed (counted once their CHAT_IN message is acked or terminated) by kind: direct, group, ephemeral, client_ack (dropped), poison (dropped).",
		}, []string{"kind"}),
		copies: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_router_copies_total",
			Help: "Message copies stored: one in INBOX per recipient of a direct message, one in GROUP_LOG per group message (a client's resend of a message counts again; a retry does not).",
		}),
		notices: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vartalap_router_notices_total",
			Help: "Error notices written to senders' inboxes, by error code.",
		}, []string{"code"}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vartalap_router_retries_total",
			Help: "CHAT_IN messages negatively acknowledged for a retry after a transient failure.",
		}),
		round: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vartalap_router_round_seconds",
			Help:    "Time to route one fetched batch of CHAT_IN messages: plan, store every copy, ack.",
			Buckets: prom.LatencyBuckets,
		}),
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vartalap_router_wait_seconds",
			Help:    "Time from a CHAT_IN message's storage to the start of the round that routes it: the router's round in progress, then the fetch (a redelivered message counts from its first storage). Across nodes it includes the difference between their clocks.",
			Buckets: prom.LatencyBuckets,
		}),
	}
	for k, name := range kindNames {
		m.byKind[k] = m.messages.WithLabelValues(name)
	}
	for _, code := range noticeCodes {
		m.notices.WithLabelValues(code)
	}
	if err := prom.Register(reg, m.messages, m.copies, m.notices, m.retries, m.round, m.wait); err != nil {
		return nil, err
	}
	return m, nil
}
