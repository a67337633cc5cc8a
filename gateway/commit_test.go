package gateway

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vartalap/vartalap/schema"
)

// Many concurrent publishers: every message is stored exactly once (a
// resend is stored again: the router de-duplicates it), in the order each
// publisher sent, and at least some share a batch.
func TestCommitterGroupsConcurrentPublishers(t *testing.T) {
	e := newEnv(t)
	const senders, per = 40, 25
	var wg sync.WaitGroup
	errs := make(chan error, senders*per)
	for s := range senders {
		wg.Go(func() {
			user := schema.UserID(fmt.Sprintf("u%d", s))
			for i := range per {
				m := &schema.Message{Version: 2.1, ID: fmt.Sprintf("m%d", i), Type: schema.TypeMessage,
					Channel: schema.ChannelIndividual, Destination: "bob"}
				m.Stamp(user, fmt.Sprintf("sid%d-%d", s, i), 1)
				if err := e.g.publish(context.Background(), user, "d1", m); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	all := e.stored(t)
	if len(all) != senders*per {
		t.Fatalf("%d messages stored, want %d", len(all), senders*per)
	}
	next := map[string]int{}
	for _, sm := range all {
		m, err := schema.UnmarshalProto(sm.Data)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("m%d", next[m.Source]); m.ID != want {
			t.Fatalf("%s's next stored message is %s, want %s", m.Source, m.ID, want)
		}
		next[m.Source]++
		if !sm.Batch || sm.Device != "d1" || sm.Subject != schema.ChatInBatch("gateway") {
			t.Fatalf("stored %+v, want a batch entry from d1", sm)
		}
	}
	info, err := e.stream.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs >= uint64(len(all)) {
		t.Fatalf("%d CHAT_IN messages for %d client messages: nothing was batched", info.State.Msgs, len(all))
	}
	t.Logf("%d client messages in %d CHAT_IN batches", len(all), info.State.Msgs)
}

// A commit larger than one batch's byte limit is split into several
// batches, all stored, in order.
func TestCommitterSplitsLargeCommits(t *testing.T) {
	e := newEnv(t)
	c := newCommitter(e.js, e.g.log, e.g.cfg.PublishTimeout, "gw1", e.g.metrics)
	defer c.close()
	c.limit = 4 << 10
	entries := make([]entry, 30)
	for i := range entries {
		m := &schema.Message{Version: 2.1, ID: fmt.Sprintf("big%d", i), Source: "alice", Destination: "bob",
			Content: make([]byte, 1000)}
		entries[i] = entry{data: m.MarshalProto(), device: "d1"}
	}
	for i, err := range c.publishAll(context.Background(), entries) {
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
	}
	all := e.stored(t)
	if len(all) != len(entries) {
		t.Fatalf("%d stored, want %d", len(all), len(entries))
	}
	for i, sm := range all {
		if m, _ := schema.UnmarshalProto(sm.Data); m == nil || m.ID != fmt.Sprintf("big%d", i) {
			t.Fatalf("entry %d out of order", i)
		}
	}
	info, err := e.stream.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs < 8 {
		t.Fatalf("30 KB in %d batches of at most 4 KiB", info.State.Msgs)
	}
}

// publishAll stores a request's messages in the order given, also when they
// share a commit with other publishers and when the committer is closed.
func TestCommitterPublishAllKeepsOrder(t *testing.T) {
	for _, closed := range []bool{false, true} {
		t.Run(fmt.Sprintf("closed=%v", closed), func(t *testing.T) {
			e := newEnv(t)
			c := newCommitter(e.js, e.g.log, e.g.cfg.PublishTimeout, "gw1", e.g.metrics)
			defer c.close()
			if closed {
				c.close()
			}
			const n = 60
			entries := make([]entry, n)
			for i := range entries {
				entries[i] = entry{data: fmt.Appendf(nil, "m%d", i), device: "d1"}
			}
			var wg sync.WaitGroup
			wg.Go(func() { // a concurrent publisher shares the commits
				for range 20 {
					if err := c.publish(context.Background(), entry{data: []byte("x"), device: "d2"}); err != nil {
						t.Error(err)
					}
				}
			})
			for i, err := range c.publishAll(context.Background(), entries) {
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
			}
			wg.Wait()
			next, others := 0, 0
			for _, sm := range e.stored(t) {
				if sm.Device != "d1" {
					others++
					continue
				}
				if want := fmt.Sprintf("m%d", next); string(sm.Data) != want {
					t.Fatalf("stored %s, want %s", sm.Data, want)
				}
				next++
			}
			if next != n || others != 20 {
				t.Fatalf("%d of %d messages and %d of 20 others stored", next, n, others)
			}
		})
	}
}

// Back-pressure: while CHAT_IN holds more than the high-water mark of
// unrouted bytes, each commit waits (at most maxPause) and the message is
// still stored afterwards.
func TestCommitterPausesOnBacklog(t *testing.T) {
	e := newEnv(t)
	c := newCommitter(e.js, e.g.log, e.g.cfg.PublishTimeout, "gw1", e.g.metrics)
	defer c.close()
	c.high, c.maxPause, c.poll = 1, 300*time.Millisecond, 5*time.Millisecond
	if err := c.publish(context.Background(), entry{data: []byte("first"), device: "d1"}); err != nil {
		t.Fatal(err)
	}
	// Nothing routes CHAT_IN in this test: the backlog stays above 1 byte.
	waitFor(t, "the backlog read", func() bool { return c.backlog.Load() > 1 })
	start := time.Now()
	if err := c.publish(context.Background(), entry{data: []byte("second"), device: "d1"}); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("commit over the high-water mark took %v, want a pause of at least 300ms", d)
	}
	if n := len(e.stored(t)); n != 2 {
		t.Fatalf("%d messages stored, want 2", n)
	}
	if testutil.ToFloat64(e.g.metrics.paused) < 0.3 {
		t.Fatalf("paused seconds %v, want >= 0.3", testutil.ToFloat64(e.g.metrics.paused))
	}
}

// publish stores e in CHAT_IN and returns once it is acknowledged or ctx
// ends (the tests' shorthand for one entry).
func (c *committer) publish(ctx context.Context, e entry) error {
	return c.publishAll(ctx, []entry{e})[0]
}
