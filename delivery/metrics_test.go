package delivery

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// A session delivers a message, delivers it again after the ack timeout,
// and applies the device's ack; a REST ack without a session counts too.
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := newEnv(t, Config{AckTimeout: 100 * time.Millisecond, Metrics: reg}, nil)
	m := e.svc.metrics
	value := func(c prometheus.Collector) float64 { return testutil.ToFloat64(c) }

	e.publish(t, "bob", "m1")
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	if got := value(m.sessions); got != 1 {
		t.Errorf("sessions = %v, want 1", got)
	}
	waitIDs(t, k, []string{"m1"})
	waitFor(t, "redelivery", func() bool { return k.count("m1") >= 2 && value(m.redelivered) >= 1 })
	ss.Ack("m1")
	waitFor(t, "ack applied", func() bool { return value(m.acks) == 1 })
	// m1 came from the stream (catch-up); "live" comes live, republished
	// with its storage time.
	if n := testutil.CollectAndCount(m.liveLag); n != 1 {
		t.Fatalf("live_lag_seconds has %d series, want 1", n)
	}
	e.publish(t, "bob", "live")
	waitFor(t, "live message", func() bool { return k.count("live") >= 1 })
	var lag dto.Metric
	if err := m.liveLag.Write(&lag); err != nil {
		t.Fatal(err)
	}
	if n, sum := lag.GetHistogram().GetSampleCount(), lag.GetHistogram().GetSampleSum(); n != 1 || sum <= 0 || sum > 5 {
		t.Errorf("live lag: %d samples, sum %.6fs; want one, in (0, 5s]", n, sum)
	}
	ss.Ack("live")
	waitFor(t, "ack applied", func() bool { return value(m.acks) == 2 })
	if got := value(m.delivered); got != 2 {
		t.Errorf("delivered = %v, want 2 (redeliveries are counted apart)", got)
	}
	if got, sent := value(m.redelivered), k.count("m1")-1+k.count("live")-1; got != float64(sent) {
		t.Errorf("redelivered = %v, sink got %d redeliveries", got, sent)
	}
	ss.Close()
	if got := value(m.sessions); got != 0 {
		t.Errorf("sessions after close = %v, want 0", got)
	}

	e.publish(t, "bob", "m2")
	if err := e.svc.AckByID(t.Context(), "bob", "phone", []string{"m2", "unknown"}); err != nil {
		t.Fatal(err)
	}
	if got := value(m.acks); got != 3 {
		t.Errorf("acks after a REST ack = %v, want 3", got)
	}

	n, err := testutil.GatherAndCount(reg, "vartalap_delivery_sessions", "vartalap_delivery_delivered_total",
		"vartalap_delivery_redelivered_total", "vartalap_delivery_acks_total")
	if err != nil || n != 4 {
		t.Errorf("gathered %d series (%v), want 4", n, err)
	}
	if _, err := New(Config{JS: e.js, Metrics: reg}); err == nil {
		t.Error("New registered its metrics twice")
	}
}
