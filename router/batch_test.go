package router

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/vartalap/vartalap/schema"
)

// publishBatch stores entries in CHAT_IN as one gateway batch and returns
// the bytes of each entry.
func (e *env) publishBatch(t testing.TB, entries ...[]byte) {
	t.Helper()
	var data []byte
	for _, p := range entries {
		data = schema.AppendBatchEntry(data, p, "phone")
	}
	pm := &nats.Msg{Subject: schema.ChatInBatch("gw1"), Data: data, Header: nats.Header{schema.HeaderBatch: []string{"1"}}}
	if _, err := e.js.PublishMsg(context.Background(), pm); err != nil {
		t.Fatalf("publish batch: %v", err)
	}
}

// A batch holds messages of several senders to users and groups: every
// direct copy is stored, in batch order per recipient, with the entry's
// bytes; the group message once, in the group's log.
func TestBatchRouted(t *testing.T) {
	l := &lister{groups: map[schema.GroupID][]schema.UserID{"team": users("alice", "bob", "carol")}}
	e := newEnv(t, 100, Config{Groups: l})
	e.start(t)
	a1 := msg("alice", "bob", "a1", schema.ChannelIndividual).MarshalProto()
	c1 := msg("carol", "bob", "c1", schema.ChannelIndividual).MarshalProto()
	b1 := msg("bob", "alice", "b1", schema.ChannelIndividual).MarshalProto()
	gm := msg("alice", "team", "g1", schema.ChannelGroup)
	g1 := gm.MarshalProto()
	e.publishBatch(t, a1, c1, b1, g1)

	bob := e.waitInbox(t, "bob", 2)
	e.waitChatInEmpty(t)
	for i, want := range [][]byte{a1, c1} {
		if !bytes.Equal(bob[i].Data, want) {
			t.Errorf("bob's message %d is %q, want entry bytes of %q", i, decode(t, bob[i].Data).ID, decode(t, want).ID)
		}
	}
	if alice := e.inbox(t, "alice"); len(alice) != 1 || !bytes.Equal(alice[0].Data, b1) {
		t.Errorf("alice's inbox: %d messages, want b1", len(alice))
	}
	if carol := e.inbox(t, "carol"); len(carol) != 0 {
		t.Errorf("carol's inbox: %d messages, want none", len(carol))
	}
	if n := e.inboxTotal(t); n != 3 {
		t.Errorf("inbox holds %d messages, want 3", n)
	}
	team := e.groupLog(t, "team")
	if len(team) != 1 {
		t.Fatalf("group log holds %d messages, want g1", len(team))
	}
	wantGroupCopy(t, team[0], gm, g1)
}

// A resend (same sender and message id, new server id) in a later batch,
// and the same id in the same batch, are stored once per recipient.
func TestBatchResendStoredOnce(t *testing.T) {
	e := newEnv(t, 100, Config{})
	e.start(t)
	first := msg("alice", "bob", "dup", schema.ChannelIndividual)
	again := msg("alice", "bob", "dup", schema.ChannelIndividual) // new ServerID
	other := msg("alice", "bob", "other", schema.ChannelIndividual)
	e.publishBatch(t, first.MarshalProto(), again.MarshalProto())
	e.publishBatch(t, again.MarshalProto(), other.MarshalProto())
	e.publishIn(t, again) // and as a single message
	e.waitChatInEmpty(t)
	got := e.inbox(t, "bob")
	if len(got) != 2 || decode(t, got[0].Data).ServerID != first.ServerID || decode(t, got[1].Data).ID != "other" {
		ids := []string{}
		for _, m := range got {
			ids = append(ids, decode(t, m.Data).ID)
		}
		t.Fatalf("bob's inbox %v, want the first dup then other", ids)
	}
}

// A bad entry in a batch is dropped; the rest of the batch is routed and
// the batch acked once (not retried, not terminated).
func TestBatchPoisonEntryDropped(t *testing.T) {
	e := newEnv(t, 100, Config{})
	e.start(t)
	noSource := msg("", "bob", "anon", schema.ChannelIndividual)
	e.publishBatch(t,
		msg("alice", "bob", "before", schema.ChannelIndividual).MarshalProto(),
		[]byte{0xff, 0xff, 0xff},
		noSource.MarshalProto(),
		msg("alice", "bob", "after", schema.ChannelIndividual).MarshalProto(),
	)
	got := e.waitInbox(t, "bob", 2)
	e.waitChatInEmpty(t)
	if decode(t, got[0].Data).ID != "before" || decode(t, got[1].Data).ID != "after" {
		t.Errorf("bob got %s, %s", decode(t, got[0].Data).ID, decode(t, got[1].Data).ID)
	}
	info, err := e.r.js.Consumer(context.Background(), schema.StreamChatIn, ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	ci, err := info.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if ci.NumRedelivered != 0 || ci.NumAckPending != 0 || ci.Delivered.Consumer != 1 {
		t.Errorf("consumer: redelivered %d, ack pending %d, delivered %d; want one delivery, acked",
			ci.NumRedelivered, ci.NumAckPending, ci.Delivered.Consumer)
	}
	if n := e.inboxTotal(t); n != 2 {
		t.Errorf("inbox holds %d messages, want 2", n)
	}
}

// A batch that does not parse is terminated; later messages are routed.
func TestMalformedBatchTerminated(t *testing.T) {
	e := newEnv(t, 100, Config{})
	terms, err := e.nc.SubscribeSync("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED." + schema.StreamChatIn + "." + ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	defer terms.Unsubscribe()
	pm := &nats.Msg{Subject: schema.ChatInBatch("gw1"), Data: []byte{0x0a, 0x7f}, Header: nats.Header{schema.HeaderBatch: []string{"1"}}}
	if _, err := e.js.PublishMsg(context.Background(), pm); err != nil {
		t.Fatal(err)
	}
	e.start(t)
	e.publishBatch(t, msg("alice", "bob", "fine", schema.ChannelIndividual).MarshalProto())
	e.waitInbox(t, "bob", 1)
	if _, err := terms.NextMsg(10 * time.Second); err != nil {
		t.Fatalf("terminated advisory: %v", err)
	}
}

// CHAT_IN is bounded: past MaxBacklogBytes of unrouted messages, a publish
// is refused, and accepted again once the router catches up.
func TestBacklogBounded(t *testing.T) {
	e := newEnv(t, 100, Config{MaxBacklogBytes: 64 << 10})
	big := make([]byte, 8<<10)
	var data []byte
	data = schema.AppendBatchEntry(data, msg("alice", "bob", "x", schema.ChannelIndividual).MarshalProto(), "phone")
	data = schema.AppendBatchEntry(data, big, "phone") // a poison entry: dropped by the router
	refused := false
	for range 20 {
		pm := &nats.Msg{Subject: schema.ChatInBatch("gw1"), Data: data, Header: nats.Header{schema.HeaderBatch: []string{"1"}}}
		if _, err := e.js.PublishMsg(context.Background(), pm); err != nil {
			refused = true
			break
		}
	}
	if !refused {
		t.Fatal("160 KiB accepted into a 64 KiB backlog")
	}
	e.start(t)
	e.waitChatInEmpty(t)
	e.publishBatch(t, msg("alice", "bob", "later", schema.ChannelIndividual).MarshalProto())
	got := e.waitInbox(t, "bob", 2)
	if decode(t, got[len(got)-1].Data).ID != "later" {
		t.Fatal("the message after the backlog drained was not routed")
	}
}

// A batch of 1 MiB (the gateway's limit) is accepted by CHAT_IN.
func TestLargeBatchAccepted(t *testing.T) {
	e := newEnv(t, 100, Config{})
	e.start(t)
	var entries [][]byte
	for i := range 16 {
		m := msg("alice", "bob", fmt.Sprintf("big%d", i), schema.ChannelIndividual)
		m.Content = make([]byte, 60<<10)
		entries = append(entries, m.MarshalProto())
	}
	e.publishBatch(t, entries...)
	e.waitInbox(t, "bob", 16)
}
