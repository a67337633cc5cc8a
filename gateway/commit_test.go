package gateway

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/vartalap/vartalap/schema"
)

// Many concurrent publishers: every message is stored exactly once, at
// least some of them in shared atomic batches, and resends of an id that
// is already stored (which reject a whole atomic batch) still succeed and
// store nothing new.
func TestCommitterGroupsAndDedupes(t *testing.T) {
	e := newEnv(t)
	const senders, per = 40, 25
	var wg sync.WaitGroup
	errs := make(chan error, senders*per*2)
	publish := func(s, i int) {
		m := &schema.Message{Version: 2.1, ID: fmt.Sprintf("m%d-%d", s, i), Type: schema.TypeMessage,
			Channel: schema.ChannelIndividual, Destination: "bob"}
		m.Stamp(schema.UserID(fmt.Sprintf("u%d", s)), fmt.Sprintf("sid%d-%d", s, i), 1)
		if err := e.g.publish(context.Background(), schema.UserID(fmt.Sprintf("u%d", s)), "d1", m); err != nil {
			errs <- err
		}
	}
	for s := range senders {
		wg.Go(func() {
			for i := range per {
				publish(s, i)
			}
		})
	}
	wg.Wait()
	// Resend every tenth message concurrently with new ones.
	for s := range senders {
		wg.Go(func() {
			for i := 0; i < per; i += 10 {
				publish(s, i)
			}
			publish(s, per) // one new message each
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	info, err := e.stream.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(senders * (per + 1)); info.State.Msgs != want {
		t.Fatalf("%d messages stored, want %d", info.State.Msgs, want)
	}
	batched := 0
	for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
		raw, err := e.stream.GetMsg(context.Background(), seq)
		if err != nil {
			t.Fatal(err)
		}
		if raw.Header.Get("Nats-Batch-Id") != "" {
			batched++
		}
	}
	if batched == 0 {
		t.Fatal("no message was written in an atomic batch")
	}
	t.Logf("%d of %d messages were written in shared atomic batches", batched, info.State.Msgs)
}

// After close, publishes still work (directly).
func TestCommitterAfterClose(t *testing.T) {
	e := newEnv(t)
	c := newCommitter(e.js, e.g.log, e.g.cfg.PublishTimeout)
	c.close()
	msg := &nats.Msg{Subject: schema.ChatIn("alice"), Header: nats.Header{}, Data: []byte("x")}
	msg.Header.Set(schema.HeaderMsgID, "alice:late")
	if err := c.publish(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
}

// publishAll stores a request's messages in the order given, also when they
// share a commit with other publishers and when the committer is closed.
func TestCommitterPublishAllKeepsOrder(t *testing.T) {
	for _, closed := range []bool{false, true} {
		t.Run(fmt.Sprintf("closed=%v", closed), func(t *testing.T) {
			e := newEnv(t)
			c := newCommitter(e.js, e.g.log, e.g.cfg.PublishTimeout)
			defer c.close()
			if closed {
				c.close()
			}
			const n = 60
			msgs := make([]*nats.Msg, n)
			for i := range msgs {
				msgs[i] = &nats.Msg{Subject: schema.ChatIn("alice"), Header: nats.Header{}, Data: fmt.Appendf(nil, "m%d", i)}
				msgs[i].Header.Set(schema.HeaderMsgID, fmt.Sprintf("alice:m%d", i))
			}
			var wg sync.WaitGroup
			wg.Go(func() { // a concurrent publisher shares the commits
				for i := range 20 {
					m := &nats.Msg{Subject: schema.ChatIn("bob"), Header: nats.Header{}, Data: []byte("x")}
					m.Header.Set(schema.HeaderMsgID, fmt.Sprintf("bob:x%d", i))
					if err := c.publish(context.Background(), m); err != nil {
						t.Error(err)
					}
				}
			})
			for i, err := range c.publishAll(context.Background(), msgs) {
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
			}
			wg.Wait()
			info, err := e.stream.Info(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			next := 0
			for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
				raw, err := e.stream.GetMsg(context.Background(), seq)
				if err != nil {
					t.Fatal(err)
				}
				if raw.Subject != schema.ChatIn("alice") {
					continue
				}
				if want := fmt.Sprintf("m%d", next); string(raw.Data) != want {
					t.Fatalf("seq %d holds %s, want %s", seq, raw.Data, want)
				}
				next++
			}
			if next != n {
				t.Fatalf("%d of %d messages stored", next, n)
			}
		})
	}
}
