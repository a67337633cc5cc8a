package push

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// One message to four devices: one push is sent, one after a retry, one
// fails for good, and one token is reported invalid and removed.
func TestMetrics(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	e.cfg.Metrics = reg
	e.snd.fn = func(_ context.Context, n Notification, attempt int) error {
		switch n.Token {
		case "bad":
			return fmt.Errorf("fake provider: %w", ErrTokenInvalid)
		case "flaky":
			if attempt == 1 {
				return &RetryableError{After: 10 * time.Millisecond, Err: errBoom}
			}
		case "broken":
			return errBoom
		}
		return nil
	}
	s := e.service(t)
	e.run(t, s)
	e.devs.set("bob", Device{"d1", "good"}, Device{"d2", "bad"}, Device{"d3", "flaky"}, Device{"d4", "broken"})
	e.waitAcked(t, e.publish(t, "bob", chat("alice", "bob", "hi")))

	for _, c := range []struct {
		name string
		c    prometheus.Collector
		want float64
	}{
		{"sent", s.metrics.sent, 2},
		{"failed", s.metrics.failed, 1},
		{"retries", s.metrics.retries, 1},
		{"tokens removed", s.metrics.tokensRemoved, 1},
	} {
		if got := testutil.ToFloat64(c.c); got != c.want {
			t.Errorf("%s = %v, want %v", c.name, got, c.want)
		}
	}
	n, err := testutil.GatherAndCount(reg, "vartalap_push_sent_total", "vartalap_push_failed_total",
		"vartalap_push_retries_total", "vartalap_push_tokens_removed_total")
	if err != nil || n != 4 {
		t.Errorf("gathered %d series (%v), want 4", n, err)
	}
	if _, err := New(e.cfg); err == nil {
		t.Error("New registered its metrics twice")
	}
}
