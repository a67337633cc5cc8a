package push

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

// TestGroupSetup: the GROUP_LOG consumer exists only with Config.Groups,
// has the INBOX consumer's settings, and needs the stream.
func TestGroupSetup(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()

	if err := e.service(t).Setup(ctx); err != nil {
		t.Fatalf("Setup without Groups: %v", err)
	}
	if _, err := e.js.Consumer(ctx, schema.StreamGroupLog, ConsumerName); !errors.Is(err, jetstream.ErrConsumerNotFound) {
		t.Fatalf("GROUP_LOG consumer without Groups: err %v, want not found", err)
	}

	e.cfg.Groups = e.groups
	if err := e.service(t).Setup(ctx); err != nil {
		t.Fatalf("Setup with Groups: %v", err)
	}
	inbox := e.consumerInfoOn(t, schema.StreamInbox).Config
	group := e.consumerInfoOn(t, schema.StreamGroupLog).Config
	if group.DeliverPolicy != jetstream.DeliverNewPolicy || group.AckPolicy != jetstream.AckExplicitPolicy ||
		group.AckWait != inbox.AckWait || group.MaxDeliver != inbox.MaxDeliver || group.MaxAckPending != inbox.MaxAckPending ||
		group.Durable != ConsumerName {
		t.Fatalf("GROUP_LOG consumer %+v, want the settings of the INBOX one %+v", group, inbox)
	}

	if err := e.js.DeleteStream(ctx, schema.StreamGroupLog); err != nil {
		t.Fatal(err)
	}
	if err := e.service(t).Setup(ctx); err == nil {
		t.Fatal("Setup with Groups but no GROUP_LOG stream succeeded")
	}
}

// TestGroupMessage: a group message stored once is pushed to the offline
// devices of the members, not to online ones nor to the sender.
func TestGroupMessage(t *testing.T) {
	e := newEnv(t)
	e.cfg.Groups = e.groups
	s := e.service(t)
	e.run(t, s)
	e.groups.set("team", "alice", "bob", "carol")
	e.devs.set("alice", Device{"a1", "ta"})                       // the sender: offline, never pushed
	e.devs.set("bob", Device{"b1", "tb"})                         // online
	e.devs.set("carol", Device{"c1", "tc1"}, Device{"c2", "tc2"}) // offline
	e.pres.set("bob", "b1")

	m := groupChat("alice", "team", "hello team")
	e.waitAckedOn(t, schema.StreamGroupLog, e.publishGroup(t, "team", m))

	var got []string
	for _, n := range e.snd.sent() {
		got = append(got, n.Token)
		if n.CollapseKey != "team" {
			t.Errorf("collapse key %q, want the group", n.CollapseKey)
		}
		if n.Data[DataMessage] != rendered(t, m) || len(n.Data) != 1 {
			t.Errorf("data %v, want only message %s", n.Data, rendered(t, m))
		}
		if n.TTL != e.service(t).ttl {
			t.Errorf("ttl %v, want %v", n.TTL, e.service(t).ttl)
		}
	}
	slices.Sort(got)
	if want := []string{"tc1", "tc2"}; !slices.Equal(got, want) {
		t.Fatalf("pushed to %v, want %v", got, want)
	}
	if st := s.Stats(); st.Sent != 2 || st.Coalesced != 0 {
		t.Fatalf("stats %+v, want sent 2", st)
	}
	if n := e.groups.calls(); n != 1 {
		t.Fatalf("%d Members calls, want 1", n)
	}

	// A group notification (e.g. a membership event) is not pushed.
	ev := groupChat("alice", "team", "")
	ev.Type = schema.TypeNotification
	e.waitAckedOn(t, schema.StreamGroupLog, e.publishGroup(t, "team", ev))
	if got := len(e.snd.sent()); got != 2 {
		t.Fatalf("%d pushes after a notification, want still 2", got)
	}
}

// TestCoalesceInboxAndGroup: an INBOX message and a group message for one
// device inside one window make one push. Both have stream sequence 1, so
// this also checks that held messages are told apart by stream, and the
// push carries the message looked up last.
func TestCoalesceInboxAndGroup(t *testing.T) {
	e := newEnv(t)
	e.cfg.Groups = e.groups
	e.cfg.Coalesce = 2 * time.Second
	e.cfg.Concurrency = 1 // one lookup worker: messages are looked up in order
	e.groups.set("team", "alice", "bob")
	e.devs.set("bob", Device{"d1", "t1"})
	s := e.service(t)
	e.run(t, s)

	direct := chat("carol", "bob", "direct")
	inSeq := e.publish(t, "bob", direct)
	waitFor(t, "the lookup of the inbox message", func() bool {
		e.devs.mu.Lock()
		defer e.devs.mu.Unlock()
		return e.devs.calls == 1
	})
	group := groupChat("alice", "team", "to the group")
	grSeq := e.publishGroup(t, "team", group)
	if inSeq != 1 || grSeq != 1 {
		t.Fatalf("sequences %d and %d, want 1 and 1", inSeq, grSeq)
	}
	e.waitAckedOn(t, schema.StreamInbox, inSeq)
	e.waitAckedOn(t, schema.StreamGroupLog, grSeq)

	got := e.snd.sentTo("t1")
	if len(got) != 1 {
		t.Fatalf("%d pushes, want 1", len(got))
	}
	if got[0].Data[DataCount] != "2" {
		t.Errorf("count %q, want 2", got[0].Data[DataCount])
	}
	if got[0].Data[DataMessage] != rendered(t, group) || got[0].CollapseKey != "team" {
		t.Errorf("push carries %s (collapse key %q), want the group message %s", got[0].Data[DataMessage], got[0].CollapseKey, rendered(t, group))
	}
	if st := s.Stats(); st.Sent != 1 || st.Coalesced != 1 {
		t.Fatalf("stats %+v, want sent 1 coalesced 1", st)
	}
}

// TestGroupGone: a message of a group the lister does not know
// (Config.IsNoGroup) is acked without a push and without redelivery; the
// next group message is pushed.
func TestGroupGone(t *testing.T) {
	e := newEnv(t)
	e.cfg.Groups = e.groups
	e.cfg.IsNoGroup = func(err error) bool { return errors.Is(err, errNoGroup) }
	e.run(t, e.service(t))
	e.groups.set("team", "alice", "bob")
	e.devs.set("bob", Device{"d1", "t1"})

	e.waitAckedOn(t, schema.StreamGroupLog, e.publishGroup(t, "gone", groupChat("alice", "gone", "lost")))
	if got := len(e.snd.all()); got != 0 {
		t.Fatalf("%d sends for a missing group, want 0", got)
	}
	if info := e.consumerInfoOn(t, schema.StreamGroupLog); info.Delivered.Consumer != 1 {
		t.Fatalf("%d deliveries, want 1 (no retry)", info.Delivered.Consumer)
	}

	m := groupChat("alice", "team", "found")
	e.waitAckedOn(t, schema.StreamGroupLog, e.publishGroup(t, "team", m))
	if got := e.snd.sentTo("t1"); len(got) != 1 || got[0].Data[DataMessage] != rendered(t, m) {
		t.Fatalf("pushes %+v, want one of the second message", got)
	}
}

// TestGroupMembersRetried: a failing member lookup is retried by
// redelivery and the push happens once it works.
func TestGroupMembersRetried(t *testing.T) {
	e := newEnv(t)
	e.cfg.Groups = e.groups
	e.cfg.IsNoGroup = func(err error) bool { return errors.Is(err, errNoGroup) }
	e.groups.fail = 1
	e.groups.set("team", "alice", "bob")
	e.devs.set("bob", Device{"d1", "t1"})
	e.run(t, e.service(t))

	e.waitAckedOn(t, schema.StreamGroupLog, e.publishGroup(t, "team", groupChat("alice", "team", "hi")))
	if got := len(e.snd.sentTo("t1")); got != 1 {
		t.Fatalf("%d pushes, want 1", got)
	}
	if n := e.groups.calls(); n != 2 {
		t.Fatalf("%d Members calls, want 2", n)
	}
	if info := e.consumerInfoOn(t, schema.StreamGroupLog); info.Delivered.Consumer != 2 {
		t.Fatalf("%d deliveries, want 2 (one redelivery)", info.Delivered.Consumer)
	}
}
