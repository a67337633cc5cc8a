package delivery

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

// memberTable is an in-memory Memberships source standing in for the groups
// service (which keeps the same records in its bucket; see package groups).
type memberTable struct {
	mu    sync.Mutex
	m     map[schema.UserID][]schema.Membership
	fails int // the next calls that fail
	calls int
}

func (mt *memberTable) Memberships(_ context.Context, u schema.UserID) ([]schema.Membership, error) {
	mt.mu.Lock()
	defer mt.mu.Unlock()
	mt.calls++
	if mt.fails > 0 {
		mt.fails--
		return nil, errors.New("groups unavailable")
	}
	return slices.Clone(mt.m[u]), nil
}

// set replaces u's epochs in g.
func (mt *memberTable) set(u schema.UserID, g schema.GroupID, epochs ...schema.Epoch) {
	mt.mu.Lock()
	defer mt.mu.Unlock()
	if mt.m == nil {
		mt.m = make(map[schema.UserID][]schema.Membership)
	}
	ms := slices.DeleteFunc(mt.m[u], func(m schema.Membership) bool { return m.Group == g })
	if len(epochs) > 0 {
		ms = append(ms, schema.Membership{Group: g, Epochs: epochs})
	}
	mt.m[u] = ms
}

func groupMsg(g schema.GroupID, from schema.UserID, id string) *schema.Message {
	return &schema.Message{
		Version:     2.1,
		ID:          id,
		Type:        schema.TypeMessage,
		Channel:     schema.ChannelGroup,
		Source:      string(from),
		Destination: string(g),
		Content:     []byte(`"hi ` + id + `"`),
		Timestamp:   uint64(time.Now().UnixMilli()),
	}
}

// publishGroup stores a group message in GROUP_LOG the way the router does
// and returns its stream sequence.
func (e *env) publishGroup(t testing.TB, g schema.GroupID, from schema.UserID, id string) uint64 {
	t.Helper()
	m := &nats.Msg{
		Subject: schema.GroupLog(g),
		Header:  nats.Header{schema.HeaderSender: []string{schema.Token(from)}},
		Data:    groupMsg(g, from, id).MarshalProto(),
	}
	ack, err := e.js.PublishMsg(t.Context(), m)
	if err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
	return ack.Sequence
}

// publishEvent stores a group membership event for user in INBOX, as the
// groups service does after a change.
func (e *env) publishEvent(t testing.TB, user schema.UserID, g schema.GroupID, action, id string) {
	t.Helper()
	m := &schema.Message{
		Version: 3.0, ID: id, Type: schema.TypeNotification, Channel: schema.ChannelIndividual,
		Source: "admin", Destination: string(g), Content: []byte(`{}`),
		Meta: map[string]string{schema.MetaAction: action},
	}
	if _, err := e.js.PublishMsg(t.Context(), &nats.Msg{Subject: schema.UserInbox(user), Data: m.MarshalProto()}); err != nil {
		t.Fatalf("publish event: %v", err)
	}
}

// A member gets the group's messages stored once in GROUP_LOG, live and on
// reconnect from its cursor, never its own, and acks are remembered.
func TestGroupLane(t *testing.T) {
	mt := &memberTable{}
	e := newEnv(t, Config{Groups: mt, CursorFlush: 10 * time.Millisecond}, nil)
	mt.set("bob", "g1", schema.Epoch{})
	e.publishGroup(t, "g1", "alice", "a1")
	e.publishGroup(t, "g1", "bob", "own") // bob's own: not for bob
	e.publishGroup(t, "g1", "carol", "c1")
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, []string{"a1", "c1"})
	e.publishGroup(t, "g1", "alice", "a2")
	e.publish(t, "bob", "direct")
	waitFor(t, "live", func() bool { return k.len() == 4 })
	got := k.ids()
	if !slices.Contains(got, "a2") || !slices.Contains(got, "direct") {
		t.Fatalf("delivered %v", got)
	}
	ss.Ack("a1", "c1", "a2", "direct")
	ss.Close()
	if c := e.cursorOf(t, "bob").Devices["phone"]; c == nil || c.Groups["g1"] == nil || c.Groups["g1"].Floor != 4 {
		t.Fatalf("cursor %+v, want group g1 floor 4", c)
	}
	// Reconnect: nothing again; a message sent meanwhile arrives.
	e.publishGroup(t, "g1", "carol", "c2")
	k2 := &testSink{}
	ss2 := e.open(t, "bob", "phone", k2)
	waitIDs(t, k2, []string{"c2"})
	time.Sleep(50 * time.Millisecond)
	if got := k2.ids(); len(got) != 1 {
		t.Fatalf("after reconnect %v, want only c2", got)
	}
	ss2.Close()
	// Another device of bob has its own group cursor: it gets every group
	// message (the inbox was purged: the only device had acked it).
	k3 := &testSink{}
	ss3 := e.open(t, "bob", "tablet", k3)
	waitFor(t, "tablet", func() bool { return k3.len() == 4 })
	ss3.Close()
}

// Epochs: a member sees only what was sent while it was a member.
func TestGroupEpochs(t *testing.T) {
	mt := &memberTable{}
	e := newEnv(t, Config{Groups: mt}, nil)
	e.publishGroup(t, "g1", "alice", "before")      // 1
	s1 := e.publishGroup(t, "g1", "alice", "first") // 2: bob added after this
	e.publishGroup(t, "g1", "alice", "m1")          // 3
	s2 := e.publishGroup(t, "g1", "alice", "m2")    // 4: bob removed after this
	e.publishGroup(t, "g1", "alice", "gap")         // 5
	s3 := e.publishGroup(t, "g1", "alice", "gap2")  // 6: bob added again
	e.publishGroup(t, "g1", "alice", "m3")          // 7
	mt.set("bob", "g1", schema.Epoch{Since: s1, Until: s2 + 1}, schema.Epoch{Since: s3})
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, []string{"m1", "m2", "m3"})
	// Removed for good: later messages are not delivered, live or read.
	s4 := e.publishGroup(t, "g1", "alice", "m4")
	mt.set("bob", "g1", schema.Epoch{Since: s1, Until: s2 + 1}, schema.Epoch{Since: s3, Until: s4 + 1})
	e.publishEvent(t, "bob", "g1", "remove", "ev-remove")
	waitFor(t, "m4 and event", func() bool { return k.len() == 5 })
	e.publishGroup(t, "g1", "alice", "after")
	time.Sleep(100 * time.Millisecond)
	if got := k.ids(); slices.Contains(got, "after") || !slices.Contains(got, "m4") {
		t.Fatalf("delivered %v: want m4, not after", got)
	}
	ss.Ack("m1", "m2", "m3", "m4", "ev-remove")
	// The ended lane goes once everything is acked; its subscription too.
	waitFor(t, "lane pruned", func() bool {
		e.svc.mu.RLock()
		defer e.svc.mu.RUnlock()
		return e.svc.groups["g1"] == nil
	})
	ss.Close()
	// Reconnect: nothing again, although the membership is still listed.
	k2 := &testSink{}
	ss2 := e.open(t, "bob", "phone", k2)
	time.Sleep(100 * time.Millisecond)
	if got := k2.ids(); len(got) != 0 {
		t.Fatalf("after reconnect %v, want nothing", got)
	}
	ss2.Close()
}

// A session learns of a group it is added to from the group event in its
// inbox and goes live on it.
func TestGroupJoinWhileConnected(t *testing.T) {
	mt := &memberTable{}
	e := newEnv(t, Config{Groups: mt}, nil)
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	e.publishGroup(t, "g1", "alice", "old") // before bob joined
	since := e.publishGroup(t, "g1", "alice", "old2")
	mt.set("bob", "g1", schema.Epoch{Since: since})
	e.publishGroup(t, "g1", "alice", "early") // after the add, before bob's session knew
	e.publishEvent(t, "bob", "g1", "add", "ev-add")
	waitIDs(t, k, []string{"ev-add", "early"})
	e.publishGroup(t, "g1", "alice", "live")
	waitIDs(t, k, []string{"ev-add", "early", "live"})
	// Deleted: the lane and its cursor go.
	ss.Ack("ev-add", "early", "live")
	mt.set("bob", "g1")
	e.publishEvent(t, "bob", "g1", "delete", "ev-del")
	waitFor(t, "unsubscribed", func() bool {
		e.svc.mu.RLock()
		defer e.svc.mu.RUnlock()
		return e.svc.groups["g1"] == nil
	})
	ss.Close()
	if c := e.cursorOf(t, "bob").Devices["phone"]; c == nil || c.Groups["g1"] != nil {
		t.Fatalf("cursor %+v: the deleted group's cursor should be gone", c)
	}
}

// Many members on one node share one subscription; each session acks on
// its own.
func TestGroupManyMembers(t *testing.T) {
	mt := &memberTable{}
	e := newEnv(t, Config{Groups: mt}, nil)
	users := []schema.UserID{"u1", "u2", "u3", "u4"}
	sinks := make([]*testSink, len(users))
	sessions := make([]*Session, len(users))
	for i, u := range users {
		mt.set(u, "team", schema.Epoch{})
		sinks[i] = &testSink{}
		sessions[i] = e.open(t, u, "phone", sinks[i])
	}
	waitFor(t, "one subscription", func() bool {
		e.svc.mu.RLock()
		defer e.svc.mu.RUnlock()
		u := e.svc.groups["team"]
		return u != nil && len(u.sessions) == len(users)
	})
	for _, id := range []string{"x1", "x2", "x3"} {
		e.publishGroup(t, "team", "u1", id)
	}
	for i := range users {
		want := []string{"x1", "x2", "x3"}
		if i == 0 {
			want = nil // u1 sent them
		}
		if want != nil {
			waitIDs(t, sinks[i], want)
		}
	}
	time.Sleep(50 * time.Millisecond)
	if n := sinks[0].len(); n != 0 {
		t.Fatalf("the sender got %d of its own messages", n)
	}
	for _, ss := range sessions {
		ss.Close()
	}
	e.svc.mu.RLock()
	defer e.svc.mu.RUnlock()
	if len(e.svc.groups) != 0 {
		t.Fatalf("subscriptions left: %d", len(e.svc.groups))
	}
}

// A failed membership load is retried; the inbox is delivered meanwhile.
func TestGroupMembershipsRetried(t *testing.T) {
	mt := &memberTable{fails: 2}
	e := newEnv(t, Config{Groups: mt}, nil)
	mt.set("bob", "g1", schema.Epoch{})
	e.publishGroup(t, "g1", "alice", "g")
	e.publish(t, "bob", "d")
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, []string{"d", "g"})
	ss.Close()
}

// REST acks reach group messages too.
func TestAckByIDGroup(t *testing.T) {
	mt := &memberTable{}
	e := newEnv(t, Config{Groups: mt}, nil)
	mt.set("bob", "g1", schema.Epoch{})
	e.publishGroup(t, "g1", "alice", "a1")
	e.publishGroup(t, "g1", "alice", "a2")
	e.publish(t, "bob", "d1")
	if err := e.svc.AckByID(t.Context(), "bob", "phone", []string{"a1", "d1"}); err != nil {
		t.Fatalf("ack: %v", err)
	}
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, []string{"a2"})
	time.Sleep(50 * time.Millisecond)
	if got := k.ids(); len(got) != 1 {
		t.Fatalf("delivered %v, want only a2", got)
	}
	ss.Close()
}

// holdDialer dials normally until held: then a dial waits until released,
// so a test can keep a connection down after closing its socket.
type holdDialer struct {
	mu   sync.Mutex
	hold chan struct{} // nil: dial at once
	last net.Conn
}

func (d *holdDialer) Dial(network, address string) (net.Conn, error) {
	d.mu.Lock()
	h := d.hold
	d.mu.Unlock()
	if h != nil {
		<-h
	}
	c, err := net.Dial(network, address)
	d.mu.Lock()
	d.last = c
	d.mu.Unlock()
	return c, err
}

// A live message sent while the service's NATS connection was down is lost
// on the way; after the reconnect the session re-reads its lanes instead of
// waiting for the subject's next message to show the gap.
func TestReconnectRereads(t *testing.T) {
	leakCheck(t)
	srv := natstest.Start(t)
	d := &holdDialer{}
	nc, err := nats.Connect(srv.ClientURL(), nats.SetCustomDialer(d), nats.MaxReconnects(-1), nats.ReconnectWait(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	mt := &memberTable{}
	e := startService(t, srv, Config{JS: js, Groups: mt}, func(s *Service) { s.dropSweep = 50 * time.Millisecond })
	mt.set("bob", "g1", schema.Epoch{})
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	e.publishGroup(t, "g1", "alice", "before")
	waitIDs(t, k, []string{"before"})

	// Take the service's connection down and keep it down.
	release := make(chan struct{})
	d.mu.Lock()
	d.hold = release
	conn := d.last
	d.mu.Unlock()
	_ = conn.Close()
	waitFor(t, "disconnected", func() bool { return !nc.IsConnected() })

	_, ojs := srv.JetStream(t)
	if _, err := ojs.PublishMsg(t.Context(), &nats.Msg{
		Subject: schema.GroupLog("g1"),
		Header:  nats.Header{schema.HeaderSender: []string{schema.Token("alice")}},
		Data:    groupMsg("g1", "alice", "lost-group").MarshalProto(),
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := ojs.PublishMsg(t.Context(), natsMsg("bob", "lost-direct")); err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	d.hold = nil
	d.mu.Unlock()
	close(release)
	waitFor(t, "both re-read", func() bool { return k.len() == 3 })
	got := k.ids()
	if !slices.Contains(got, "lost-group") || !slices.Contains(got, "lost-direct") {
		t.Fatalf("delivered %v", got)
	}
	ss.Close()
}
