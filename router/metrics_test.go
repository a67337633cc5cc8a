package router

import (
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/vartalap/vartalap/schema"
)

// A gateway batch of a direct message, a group message, one with a bad
// destination, a CLIENT_ACK and an undecodable entry, whose first routing
// fails on a group lookup; then a live ephemeral message. Every client
// message, copy and notice is counted once although the batch was routed
// twice.
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	l := &lister{groups: map[schema.GroupID][]schema.UserID{"team": users("alice", "bob", "carol")}, fails: 1}
	e := newEnv(t, 100, Config{Groups: l, Metrics: reg})
	e.start(t)
	e.waitLiveSubscribed(t)

	ack := msg("alice", "bob", "ack-1", schema.ChannelIndividual)
	ack.Type = schema.TypeClientAck
	e.publishBatch(t,
		msg("alice", "bob", "d1", schema.ChannelIndividual).MarshalProto(),
		msg("alice", "team", "g1", schema.ChannelGroup).MarshalProto(),
		msg("alice", "bob.*", "bad", schema.ChannelIndividual).MarshalProto(),
		ack.MarshalProto(),
		[]byte{0xff, 0xff, 0xff},
	)
	e.waitChatInEmpty(t)
	eph := msg("alice", "bob", "e1", schema.ChannelIndividual)
	eph.Ephemeral = true
	if err := e.nc.Publish(schema.Live("alice"), eph.MarshalProto()); err != nil {
		t.Fatal(err)
	}

	m := e.r.metrics
	e.poll(t, "ephemeral counted", func() (bool, string) {
		v := testutil.ToFloat64(m.byKind[kindEphemeral])
		return v == 1, fmt.Sprintf("ephemeral = %v", v)
	})
	want := map[string]float64{"direct": 2, "group": 1, "ephemeral": 1, "client_ack": 1, "poison": 1}
	for k, name := range kindNames {
		if got := testutil.ToFloat64(m.byKind[k]); got != want[name] {
			t.Errorf("messages{kind=%q} = %v, want %v", name, got, want[name])
		}
	}
	// d1 in bob's inbox, g1 once in the group's log.
	inboxCopies := len(e.inbox(t, "bob")) + len(e.inbox(t, "carol"))
	stored := inboxCopies + len(e.groupLog(t, "team"))
	if got := testutil.ToFloat64(m.copies); got != float64(stored) || stored != 2 {
		t.Errorf("copies_total = %v, copies stored %d, want 2", got, stored)
	}
	if got := testutil.ToFloat64(m.notices.WithLabelValues(schema.CodeBadTo)); got != 1 {
		t.Errorf("notices{bad_to} = %v, want 1", got)
	}
	if n := e.inboxTotal(t); n != uint64(inboxCopies)+1 {
		t.Errorf("inbox holds %d messages, want the %d copies and one notice", n, inboxCopies)
	}
	if n := e.groupLogTotal(t); n != 1 {
		t.Errorf("group log holds %d messages, want 1", n)
	}
	if got := testutil.ToFloat64(m.retries); got != 1 {
		t.Errorf("retries = %v, want 1", got)
	}
	var round dto.Metric
	if err := m.round.Write(&round); err != nil {
		t.Fatal(err)
	}
	if n := round.GetHistogram().GetSampleCount(); n < 2 {
		t.Errorf("%d routing rounds observed, want at least 2", n)
	}
	// Every fetch of a CHAT_IN message waited: the batch twice (the retry
	// after the failed lookup), the ephemeral message never (not stored).
	var wait dto.Metric
	if err := m.wait.Write(&wait); err != nil {
		t.Fatal(err)
	}
	if n := wait.GetHistogram().GetSampleCount(); n != 2 {
		t.Errorf("%d CHAT_IN waits observed, want 2", n)
	}
	if s := wait.GetHistogram().GetSampleSum(); s < 1 {
		t.Errorf("waits sum to %.3fs, want at least the 1-s retry delay", s)
	}

	// Registered: every kind and every notice code from the start.
	if n, err := testutil.GatherAndCount(reg, "vartalap_router_messages_total"); err != nil || n != len(kindNames) {
		t.Errorf("gathered %d kinds (%v), want %d", n, err, len(kindNames))
	}
	if n, err := testutil.GatherAndCount(reg, "vartalap_router_notices_total"); err != nil || n != len(noticeCodes) {
		t.Errorf("gathered %d notice codes (%v), want %d", n, err, len(noticeCodes))
	}
	if n := testutil.CollectAndCount(m.round); n != 1 {
		t.Errorf("round_seconds has %d series, want 1", n)
	}
	if _, err := New(Config{JS: e.js, Metrics: reg}); err == nil {
		t.Error("New registered its metrics twice")
	}
}
