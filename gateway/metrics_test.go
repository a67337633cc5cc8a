package gateway

import (
	"net/http"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/vartalap/vartalap/schema"
)

// sampleCount returns the number of observations of a histogram.
func sampleCount(t testing.TB, h prometheus.Histogram) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// waitValue polls until the counter or gauge c reads want.
func waitValue(t testing.TB, what string, c prometheus.Collector, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := testutil.ToFloat64(c)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", what, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Real traffic through a socket and POST /messages moves the counters; the
// collectors are registered on the Registerer of the Config.
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := newEnv(t, withConfig(func(c *Config) { c.Metrics = reg }))
	m := e.g.metrics

	ws := e.dial(t, "ack=true", nil)
	waitValue(t, "connections", m.conns, 1)

	writeText(t, ws, chatJSON("m1", "bob"))
	if typ, data := read(t, ws); parseAck(t, typ, data).ID != "m1" {
		t.Fatalf("no SERVER_ACK for m1")
	}
	writeText(t, ws, "{not json")
	if typ, data := read(t, ws); parseNotice(t, typ, data).code != schema.CodeMalformed {
		t.Fatalf("want a malformed notice")
	}
	// A CLIENT_ACK and a ping are not messages.
	writeText(t, ws, `{"_v":2.1,"id":"x1","head":{"contentType":"CLIENT_ACK","to":"server"},"body":{}}`)
	expectPong(t, ws)

	if got := testutil.ToFloat64(m.accepted); got != 1 {
		t.Errorf("accepted = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.rejected); got != 1 {
		t.Errorf("rejected = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.rejections.WithLabelValues(schema.CodeMalformed)); got != 1 {
		t.Errorf("rejections{malformed} = %v, want 1", got)
	}
	// The SERVER_ACK, the error notice and the pong.
	waitValue(t, "frames written", m.frames, 3)
	if n := sampleCount(t, m.commitMsgs); n != 1 {
		t.Errorf("commit batches observed %d, want 1", n)
	}
	if n := sampleCount(t, m.commitTime); n != 1 {
		t.Errorf("commit times observed %d, want 1", n)
	}

	_ = ws.Close()
	waitValue(t, "connections after close", m.conns, 0)

	// REST: every entry counts.
	status, body := e.post(t, "/messages", credHeader("alice", "ka"),
		jsonArray(chatJSON("r1", "bob"), chatJSON("r2", "bob.>")))
	if status != http.StatusCreated {
		t.Fatalf("REST status %d: %s", status, body)
	}
	if got := testutil.ToFloat64(m.accepted); got != 2 {
		t.Errorf("accepted after REST = %v, want 2", got)
	}
	if got := testutil.ToFloat64(m.rejections.WithLabelValues(schema.CodeBadTo)); got != 1 {
		t.Errorf("rejections{bad_to} = %v, want 1", got)
	}

	// Registered: one series per result, per pre-set code, and one each
	// for the others.
	if n := testutil.CollectAndCount(m.messages); n != 2 {
		t.Errorf("%d messages series, want 2", n)
	}
	n, err := testutil.GatherAndCount(reg, "vartalap_gateway_messages_total", "vartalap_gateway_connections",
		"vartalap_gateway_commit_messages", "vartalap_gateway_commit_seconds", "vartalap_gateway_frames_written_total")
	if err != nil || n != 6 {
		t.Errorf("gathered %d series (%v), want 6", n, err)
	}
	if n, err := testutil.GatherAndCount(reg, "vartalap_gateway_rejections_total"); err != nil || n != len(rejectionCodes) {
		t.Errorf("gathered %d rejection series (%v), want %d", n, err, len(rejectionCodes))
	}

	// A second gateway on the same registry is refused.
	if _, err := New(Config{JS: e.js, Auth: testAuth{}, Delivery: e.del, Metrics: reg}); err == nil {
		t.Error("New registered its metrics twice")
	}
}

// A message the bus does not store is rejected as unavailable; without a
// Registerer the collectors count all the same.
func TestMetricsUnavailable(t *testing.T) {
	e := newEnv(t, withoutStream(), withConfig(func(c *Config) { c.PublishTimeout = 2 * time.Second }))
	ws := e.dial(t, "format=binary", nil)
	writeText(t, ws, chatJSON("u1", "bob"))
	if typ, data := read(t, ws); typ != websocket.BinaryMessage || parseNotice(t, typ, data).code != schema.CodeUnavailable {
		t.Fatalf("want an unavailable notice")
	}
	m := e.g.metrics
	if a, r := testutil.ToFloat64(m.accepted), testutil.ToFloat64(m.rejected); a != 0 || r != 1 {
		t.Errorf("accepted %v rejected %v, want 0 1", a, r)
	}
	if got := testutil.ToFloat64(m.rejections.WithLabelValues(schema.CodeUnavailable)); got != 1 {
		t.Errorf("rejections{unavailable} = %v, want 1", got)
	}
	if n := sampleCount(t, m.commitTime); n != 0 {
		t.Errorf("%d commit times observed for a failed commit, want 0", n)
	}
}
