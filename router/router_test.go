package router

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"
	"go.uber.org/goleak"

	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/internal/testlog"
	"github.com/vartalap/vartalap/schema"
)

// env is one test's embedded JetStream with CHAT_IN (via Setup), and INBOX
// and GROUP_LOG streams configured like delivery's.
type env struct {
	srv *natstest.Server
	nc  *nats.Conn
	js  jetstream.JetStream
	r   *Router
}

// inboxConfig mirrors the delivery package's INBOX stream: one subject per
// user, atomic publish, direct get, per-subject cap with DiscardNew.
func inboxConfig(maxPerUser int64) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:                 schema.StreamInbox,
		Subjects:             []string{schema.SubjectInboxAll},
		Storage:              jetstream.FileStorage,
		Retention:            jetstream.LimitsPolicy,
		MaxMsgsPerSubject:    maxPerUser,
		Discard:              jetstream.DiscardNew,
		DiscardNewPerSubject: true,
		AllowAtomicPublish:   true,
		AllowDirect:          true,
		Duplicates:           2 * time.Minute,
		RePublish:            &jetstream.RePublish{Source: schema.SubjectInboxAll, Destination: schema.SubjectDeliverRepub},
	}
}

// groupLogConfig mirrors the delivery package's GROUP_LOG stream: one
// subject per group, each group message stored once, atomic publish, direct
// get, a per-subject cap with DiscardOld (a group's log never refuses a
// message for being full).
func groupLogConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:               schema.StreamGroupLog,
		Subjects:           []string{schema.SubjectGroupLogAll},
		Storage:            jetstream.FileStorage,
		Retention:          jetstream.LimitsPolicy,
		MaxMsgsPerSubject:  100_000,
		Discard:            jetstream.DiscardOld,
		AllowAtomicPublish: true,
		AllowDirect:        true,
		Duplicates:         2 * time.Minute,
		RePublish:          &jetstream.RePublish{Source: schema.SubjectGroupLogAll, Destination: schema.SubjectDeliverGroupRepub},
	}
}

func newEnv(t testing.TB, maxPerUser int64, cfg Config) *env {
	t.Helper()
	srv := natstest.Start(t)
	nc, js := srv.JetStream(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, inboxConfig(maxPerUser)); err != nil {
		t.Fatalf("create inbox: %v", err)
	}
	if _, err := js.CreateStream(ctx, groupLogConfig()); err != nil {
		t.Fatalf("create group log: %v", err)
	}
	cfg.JS = js
	r, err := New(cfg)
	if err != nil {
		t.Fatalf("new: %v", err)
	}
	if err := r.Setup(ctx); err != nil {
		t.Fatalf("setup: %v", err)
	}
	return &env{srv: srv, nc: nc, js: js, r: r}
}

// start runs the router until the returned stop is called (or the test
// ends). stop checks that Run returns nil within a deadline and leaks no
// goroutine.
func (e *env) start(t testing.TB) (stop func()) {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.r.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("run: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("run did not return after cancel")
			}
			// A block's flush loop of the embedded server may outlive its
			// stream briefly; it belongs to nats-server, not to Run.
			if err := goleak.Find(ignore, goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server.(*msgBlock).flushLoop")); err != nil {
				t.Errorf("goroutine leak: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

var serverSeq atomic.Int64

// msg returns a message from -> to as the gateway accepts it.
func msg(from, to, id string, ch schema.Channel) *schema.Message {
	seq := serverSeq.Add(1)
	return &schema.Message{
		Version:         2.1,
		ID:              id,
		Type:            schema.TypeMessage,
		Channel:         ch,
		Source:          from,
		Destination:     to,
		Content:         []byte(`{"text":"hello ` + id + `"}`),
		Timestamp:       1700000000000,
		ServerID:        fmt.Sprintf("srv-%d-%s", seq, id),
		ServerTimestamp: 1700000000001,
	}
}

// publishIn publishes m to CHAT_IN like the gateway does and returns the
// bytes published.
func (e *env) publishIn(t testing.TB, m *schema.Message) []byte {
	t.Helper()
	data := m.MarshalProto()
	e.publishRaw(t, schema.UserID(m.Source), m.ID, data)
	return data
}

func (e *env) publishRaw(t testing.TB, from schema.UserID, id string, data []byte) *jetstream.PubAck {
	t.Helper()
	pm := &nats.Msg{Subject: schema.ChatIn(from), Data: data, Header: nats.Header{}}
	pm.Header.Set(schema.HeaderMsgID, schema.Token(from)+":"+id)
	pm.Header.Set(schema.HeaderDevice, "default")
	ack, err := e.js.PublishMsg(context.Background(), pm)
	if err != nil {
		t.Fatalf("publish chat_in: %v", err)
	}
	return ack
}

// waitChatInEmpty waits until every CHAT_IN message has been routed, acked
// and purged (the router purges up to its ack floor every 250 ms).
func (e *env) waitChatInEmpty(t testing.TB) {
	t.Helper()
	e.poll(t, "chat_in empty", func() (bool, string) {
		st, err := e.js.Stream(context.Background(), schema.StreamChatIn)
		if err != nil {
			return false, err.Error()
		}
		info, err := st.Info(context.Background())
		if err != nil {
			return false, err.Error()
		}
		return info.State.Msgs == 0, fmt.Sprintf("%d messages left", info.State.Msgs)
	})
}

func (e *env) poll(t testing.TB, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %s", what, state)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inbox returns the messages stored in u's inbox, in stream order.
func (e *env) inbox(t testing.TB, u schema.UserID) []*jetstream.RawStreamMsg {
	t.Helper()
	return e.subjectMsgs(t, schema.StreamInbox, schema.UserInbox(u))
}

// groupLog returns the messages stored for group g in GROUP_LOG, in stream
// order.
func (e *env) groupLog(t testing.TB, g schema.GroupID) []*jetstream.RawStreamMsg {
	t.Helper()
	return e.subjectMsgs(t, schema.StreamGroupLog, schema.GroupLog(g))
}

// subjectMsgs returns the messages stored on subj in stream, in order.
func (e *env) subjectMsgs(t testing.TB, stream, subj string) []*jetstream.RawStreamMsg {
	t.Helper()
	ctx := context.Background()
	st, err := e.js.Stream(ctx, stream)
	if err != nil {
		t.Fatalf("stream %s: %v", stream, err)
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(subj))
	if err != nil {
		t.Fatalf("stream %s info: %v", stream, err)
	}
	want := int(info.State.Subjects[subj])
	var out []*jetstream.RawStreamMsg
	seq := uint64(1)
	for len(out) < want {
		it, err := jetstreamext.GetBatch(ctx, e.js, stream, 100,
			jetstreamext.GetBatchSeq(seq), jetstreamext.GetBatchSubject(subj))
		if err != nil {
			t.Fatalf("get batch from %s: %v", stream, err)
		}
		for m, err := range it {
			if err != nil {
				t.Fatalf("get batch from %s: %v", stream, err)
			}
			out = append(out, m)
			seq = m.Sequence + 1
		}
	}
	return out
}

func (e *env) inboxTotal(t testing.TB) uint64 {
	t.Helper()
	return e.streamMsgs(t, schema.StreamInbox)
}

func (e *env) groupLogTotal(t testing.TB) uint64 {
	t.Helper()
	return e.streamMsgs(t, schema.StreamGroupLog)
}

// streamMsgs returns the number of messages stored in stream.
func (e *env) streamMsgs(t testing.TB, stream string) uint64 {
	t.Helper()
	st, err := e.js.Stream(context.Background(), stream)
	if err != nil {
		t.Fatalf("stream %s: %v", stream, err)
	}
	info, err := st.Info(context.Background())
	if err != nil {
		t.Fatalf("stream %s info: %v", stream, err)
	}
	return info.State.Msgs
}

func (e *env) waitInbox(t testing.TB, u schema.UserID, n int) []*jetstream.RawStreamMsg {
	t.Helper()
	e.poll(t, fmt.Sprintf("%d messages for %s", n, u), func() (bool, string) {
		got := len(e.inbox(t, u))
		return got >= n, fmt.Sprintf("%d messages", got)
	})
	return e.inbox(t, u)
}

func (e *env) waitGroupLog(t testing.TB, g schema.GroupID, n int) []*jetstream.RawStreamMsg {
	t.Helper()
	e.poll(t, fmt.Sprintf("%d messages of group %s", n, g), func() (bool, string) {
		got := len(e.groupLog(t, g))
		return got >= n, fmt.Sprintf("%d messages", got)
	})
	return e.groupLog(t, g)
}

// wantGroupCopy checks that raw is the one stored copy of group message m
// (sent as the bytes sent): the unchanged bytes, with the sender's token in
// the Vartalap-Sender header and the group de-duplication id.
func wantGroupCopy(t testing.TB, raw *jetstream.RawStreamMsg, m *schema.Message, sent []byte) {
	t.Helper()
	g, from := schema.GroupID(m.Destination), schema.UserID(m.Source)
	if raw.Subject != schema.GroupLog(g) {
		t.Errorf("group copy on %s, want %s", raw.Subject, schema.GroupLog(g))
	}
	if !bytes.Equal(raw.Data, sent) {
		t.Errorf("group copy of %s differs from the published bytes", m.ID)
	}
	if s := raw.Header.Get(schema.HeaderSender); s != schema.Token(from) {
		t.Errorf("group copy %s header %q, want %q", schema.HeaderSender, s, schema.Token(from))
	}
	wantID := "g:" + schema.Token(g) + ":" + schema.Token(from) + ":" + m.ID
	if id := raw.Header.Get(schema.HeaderMsgID); id != wantID {
		t.Errorf("group copy Nats-Msg-Id %q, want %q", id, wantID)
	}
}

func decode(t testing.TB, data []byte) *schema.Message {
	t.Helper()
	m, err := schema.UnmarshalProto(data)
	if err != nil {
		t.Fatalf("decode: %v", err)
	}
	return m
}

// wantNotice checks that raw is an error notice with code about msgID.
func wantNotice(t testing.TB, raw *jetstream.RawStreamMsg, to, msgID, code string) {
	t.Helper()
	n := decode(t, raw.Data)
	if n.Type != schema.TypeNotification || n.Source != schema.ServerSource || n.Action() != "error" {
		t.Errorf("notice: type %v source %q action %q, want NOTIFICATION from server with action error", n.Type, n.Source, n.Action())
	}
	if n.Destination != to || n.ID != msgID || n.Meta["code"] != code {
		t.Errorf("notice: to %q id %q code %q, want %q %q %q", n.Destination, n.ID, n.Meta["code"], to, msgID, code)
	}
	if n.Ephemeral {
		t.Error("stored notice is ephemeral")
	}
}

// lister is an in-memory MemberLister standing in for the groups service.
type lister struct {
	mu     sync.Mutex
	groups map[schema.GroupID][]schema.UserID
	fails  int // the next fails calls return a transient error
	calls  int
}

func (l *lister) Members(_ context.Context, g schema.GroupID) ([]schema.UserID, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls++
	if l.fails > 0 {
		l.fails--
		return nil, errors.New("groups service unavailable")
	}
	m, ok := l.groups[g]
	if !ok {
		return nil, fmt.Errorf("group %s: %w", g, ErrNoGroup)
	}
	return m, nil
}

func (l *lister) callCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls
}

func users(names ...string) []schema.UserID {
	out := make([]schema.UserID, len(names))
	for i, n := range names {
		out[i] = schema.UserID(n)
	}
	return out
}

func TestNew(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.JetStream(t)
	tests := []struct {
		name    string
		cfg     Config
		wantErr bool
		check   func(t *testing.T, r *Router)
	}{
		{name: "defaults", cfg: Config{JS: js}, check: func(t *testing.T, r *Router) {
			if r.batch != DefaultBatch || r.maxMsg != DefaultMaxMessageBytes || r.repl != DefaultReplicas {
				t.Errorf("batch %d max %d replicas %d, want defaults", r.batch, r.maxMsg, r.repl)
			}
			if r.nc != js.Conn() || r.log == nil {
				t.Error("nc or logger not defaulted")
			}
		}},
		{name: "explicit", cfg: Config{JS: js, Batch: 8, MaxMessageBytes: 2 << 20, Replicas: 3}, check: func(t *testing.T, r *Router) {
			if r.batch != 8 || r.maxMsg != 2<<20 || r.repl != 3 {
				t.Errorf("batch %d max %d replicas %d, want 8 2 MiB 3", r.batch, r.maxMsg, r.repl)
			}
		}},
		{name: "no jetstream", cfg: Config{}, wantErr: true},
		{name: "negative batch", cfg: Config{JS: js, Batch: -1}, wantErr: true},
		{name: "negative size", cfg: Config{JS: js, MaxMessageBytes: -1}, wantErr: true},
		{name: "size below a batch", cfg: Config{JS: js, MaxMessageBytes: 256 << 10}, wantErr: true},
		{name: "negative backlog", cfg: Config{JS: js, MaxBacklogBytes: -1}, wantErr: true},
		{name: "negative replicas", cfg: Config{JS: js, Replicas: -1}, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, err := New(tc.cfg)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if tc.check != nil {
				tc.check(t, r)
			}
		})
	}
}

func TestSetupIdempotent(t *testing.T) {
	e := newEnv(t, 100, Config{Batch: 16, MaxMessageBytes: 3 << 20})
	ctx := context.Background()
	if err := e.r.Setup(ctx); err != nil {
		t.Fatalf("second setup: %v", err)
	}
	st, err := e.js.Stream(ctx, schema.StreamChatIn)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	if cfg.Retention != jetstream.LimitsPolicy || cfg.MaxAge != maxChatInAge || cfg.Storage != jetstream.FileStorage ||
		cfg.Duplicates != 2*time.Minute || cfg.MaxMsgSize != 3<<20 || cfg.MaxBytes != DefaultMaxBacklogBytes || cfg.Discard != jetstream.DiscardNew || !slices.Equal(cfg.Subjects, []string{"msg.in.>"}) {
		t.Errorf("chat_in config: %+v", cfg)
	}
	c, err := st.Consumer(ctx, ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	cc := c.CachedInfo().Config
	if cc.AckPolicy != jetstream.AckExplicitPolicy || cc.MaxDeliver != maxDeliver || cc.AckWait != ackWait ||
		len(cc.BackOff) == 0 || cc.MaxAckPending < 2*16 {
		t.Errorf("consumer config: %+v", cc)
	}
}

func TestRunWithoutSetup(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.JetStream(t)
	r, err := New(Config{JS: js})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(context.Background()); err == nil {
		t.Fatal("run without setup succeeded")
	}
}

func TestRoute1to1(t *testing.T) {
	e := newEnv(t, 100, Config{})
	e.start(t)
	m := msg("alice", "bob", "m1", schema.ChannelIndividual)
	sent := e.publishIn(t, m)

	got := e.waitInbox(t, "bob", 1)
	e.waitChatInEmpty(t)
	if len(got) != 1 {
		t.Fatalf("bob has %d messages, want 1", len(got))
	}
	if !bytes.Equal(got[0].Data, sent) {
		t.Errorf("copy differs from the published bytes")
	}
	if id := got[0].Header.Get(schema.HeaderMsgID); id != "c:bob:alice:m1" {
		t.Errorf("copy Nats-Msg-Id %q, want %q", id, "c:bob:alice:m1")
	}
	if n := e.inboxTotal(t); n != 1 {
		t.Errorf("inbox holds %d messages, want 1", n)
	}
}

func TestRouteChannels(t *testing.T) {
	tests := []struct {
		name string
		to   string
		ch   schema.Channel
		typ  schema.Type
	}{
		{name: "individual", to: "bob", ch: schema.ChannelIndividual, typ: schema.TypeMessage},
		{name: "other", to: "bot-1", ch: schema.ChannelOther, typ: schema.TypeCustom},
		{name: "unknown", to: "carol", ch: schema.ChannelUnknown, typ: schema.TypeNotification},
		{name: "encoded id", to: "+919999999999", ch: schema.ChannelIndividual, typ: schema.TypeMessage},
	}
	e := newEnv(t, 100, Config{})
	e.start(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := msg("alice", tc.to, "c-"+tc.name, tc.ch)
			m.Type = tc.typ
			sent := e.publishIn(t, m)
			got := e.waitInbox(t, schema.UserID(tc.to), 1)
			if !bytes.Equal(got[len(got)-1].Data, sent) {
				t.Errorf("copy differs from the published bytes")
			}
		})
	}
}

func TestDedupe(t *testing.T) {
	t.Run("same chat_in msg id", func(t *testing.T) {
		e := newEnv(t, 100, Config{})
		m := msg("alice", "bob", "dup", schema.ChannelIndividual)
		e.publishIn(t, m)
		if ack := e.publishRaw(t, "alice", m.ID, m.MarshalProto()); !ack.Duplicate {
			t.Fatal("second publish was not a duplicate")
		}
		e.start(t)
		e.waitInbox(t, "bob", 1)
		e.waitChatInEmpty(t)
		if n := e.inboxTotal(t); n != 1 {
			t.Errorf("inbox holds %d messages, want 1", n)
		}
	})

	t.Run("redelivery after crash", func(t *testing.T) {
		l := &lister{groups: map[schema.GroupID][]schema.UserID{"g1": users("alice", "bob", "carol", "dave")}}
		e := newEnv(t, 100, Config{Groups: l})
		one := msg("alice", "bob", "crash-1", schema.ChannelIndividual)
		grp := msg("alice", "g1", "crash-2", schema.ChannelGroup)
		e.publishIn(t, one)
		grpSent := e.publishIn(t, grp)

		// A router stores the copies and dies before acking.
		ctx := context.Background()
		cons, err := e.js.Consumer(ctx, schema.StreamChatIn, ConsumerName)
		if err != nil {
			t.Fatal(err)
		}
		fetchedMsgs, err := cons.Fetch(2, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		var batch []jetstream.Msg
		for jm := range fetchedMsgs.Messages() {
			batch = append(batch, jm)
		}
		if len(batch) != 2 {
			t.Fatalf("fetched %d messages, want 2", len(batch))
		}
		srcs := make([]fetched, len(batch))
		for i, jm := range batch {
			srcs[i].jm = jm
		}
		for _, it := range e.r.storeBatch(ctx, srcs) {
			if it.done || it.failed {
				t.Fatalf("first attempt: done %v failed %v", it.done, it.failed)
			}
		}
		if n, g := e.inboxTotal(t), e.groupLogTotal(t); n != 1 || g != 1 {
			t.Fatalf("after the first attempt the inbox holds %d messages and the group log %d, want 1 and 1", n, g)
		}
		// The server redelivers once the ack wait expires; Nak stands in
		// for the 30 s wait.
		for _, jm := range batch {
			if err := jm.Nak(); err != nil {
				t.Fatal(err)
			}
		}

		e.start(t)
		e.waitChatInEmpty(t)
		want := map[schema.UserID]int{"bob": 1, "carol": 0, "dave": 0, "alice": 0}
		for u, n := range want {
			if got := len(e.inbox(t, u)); got != n {
				t.Errorf("%s has %d messages, want %d", u, got, n)
			}
		}
		// The group message is stored once, on the group's log only.
		if got := e.groupLog(t, "g1"); len(got) != 1 {
			t.Errorf("group log holds %d messages, want 1", len(got))
		} else {
			wantGroupCopy(t, got[0], grp, grpSent)
		}
		if n, g := e.inboxTotal(t), e.groupLogTotal(t); n != 1 || g != 1 {
			t.Errorf("inbox holds %d messages and the group log %d, want 1 and 1", n, g)
		}
		info, err := cons.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.NumRedelivered != 0 || info.NumAckPending != 0 || info.Delivered.Consumer < 4 {
			t.Errorf("consumer: redelivered %d ack pending %d delivered %d, want both messages delivered twice and acked",
				info.NumRedelivered, info.NumAckPending, info.Delivered.Consumer)
		}
	})
}

// A group message from a current member is stored once, on the group's
// GROUP_LOG subject, whatever the number of members; no member gets an INBOX
// copy. Refusals are notices in the sender's inbox and store nothing in
// GROUP_LOG.
func TestGroup(t *testing.T) {
	l := &lister{groups: map[schema.GroupID][]schema.UserID{
		"team":  users("alice", "bob", "carol", "bob", "alice", "dave"),
		"solo":  users("alice"),
		"other": users("bob", "carol"),
		"intl":  users("+919999999999", "bob@example.com"),
	}}
	tests := []struct {
		name   string
		from   string
		group  string
		notice string // code of the notice to the sender; "": stored in GROUP_LOG
	}{
		{name: "members", from: "alice", group: "team"},
		{name: "member alone", from: "alice", group: "solo"},
		{name: "encoded ids", from: "+919999999999", group: "intl"},
		{name: "non-member", from: "alice", group: "other", notice: schema.CodeNotMember},
		{name: "unknown group", from: "alice", group: "nope", notice: schema.CodeUnknownGroup},
		{name: "invalid group id", from: "alice", group: "a.b", notice: schema.CodeBadTo},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 100, Config{Groups: l})
			e.start(t)
			m := msg(tc.from, tc.group, "g-"+tc.name, schema.ChannelGroup)
			sent := e.publishIn(t, m)
			e.waitChatInEmpty(t)

			senderInbox := e.inbox(t, schema.UserID(tc.from))
			if tc.notice != "" {
				if len(senderInbox) != 1 {
					t.Fatalf("sender has %d messages, want 1 notice", len(senderInbox))
				}
				wantNotice(t, senderInbox[0], tc.from, m.ID, tc.notice)
				if n := e.inboxTotal(t); n != 1 {
					t.Errorf("inbox holds %d messages, want the notice", n)
				}
				if n := e.groupLogTotal(t); n != 0 {
					t.Errorf("group log holds %d messages, want none", n)
				}
				return
			}
			got := e.groupLog(t, schema.GroupID(tc.group))
			if len(got) != 1 {
				t.Fatalf("group log of %s holds %d messages, want 1", tc.group, len(got))
			}
			wantGroupCopy(t, got[0], m, sent)
			if d := decode(t, got[0].Data).Destination; d != tc.group {
				t.Errorf("destination %q, want the group id", d)
			}
			if n := e.groupLogTotal(t); n != 1 {
				t.Errorf("group log holds %d messages, want 1", n)
			}
			if n := e.inboxTotal(t); n != 0 {
				t.Errorf("inbox holds %d messages, want none (no per-member copies, no notice)", n)
			}
		})
	}
}

// A resend of a group message (same sender and client id, new server id), in
// a later CHAT_IN message, a gateway batch or the same batch, is stored once:
// the first one. The same client id from another sender, or to another
// group, is another message.
func TestGroupResendStoredOnce(t *testing.T) {
	l := &lister{groups: map[schema.GroupID][]schema.UserID{
		"team": users("alice", "bob", "carol"),
		"pair": users("alice", "bob"),
	}}
	e := newEnv(t, 100, Config{Groups: l})
	e.start(t)
	first := msg("alice", "team", "dup", schema.ChannelGroup)
	sent := e.publishIn(t, first)
	e.waitGroupLog(t, "team", 1)
	again := msg("alice", "team", "dup", schema.ChannelGroup) // new ServerID
	e.publishIn(t, again)
	e.publishBatch(t, again.MarshalProto(), again.MarshalProto())
	// A round large enough for an atomic batch, holding resends too.
	fromBob := msg("bob", "team", "dup", schema.ChannelGroup)
	bobSent := fromBob.MarshalProto()
	toPair := msg("alice", "pair", "dup", schema.ChannelGroup)
	pairSent := toPair.MarshalProto()
	n1 := msg("carol", "team", "n1", schema.ChannelGroup)
	n2 := msg("carol", "team", "n2", schema.ChannelGroup)
	e.publishBatch(t, bobSent, again.MarshalProto(), pairSent, n1.MarshalProto(), again.MarshalProto(), n2.MarshalProto())
	e.waitChatInEmpty(t)

	team := e.groupLog(t, "team")
	if len(team) != 4 {
		t.Fatalf("group log of team holds %d messages, want 4 (alice's first dup, bob's, n1, n2)", len(team))
	}
	wantGroupCopy(t, team[0], first, sent)
	wantGroupCopy(t, team[1], fromBob, bobSent)
	wantGroupCopy(t, team[2], n1, n1.MarshalProto())
	wantGroupCopy(t, team[3], n2, n2.MarshalProto())
	pair := e.groupLog(t, "pair")
	if len(pair) != 1 {
		t.Fatalf("group log of pair holds %d messages, want 1", len(pair))
	}
	wantGroupCopy(t, pair[0], toPair, pairSent)
	if n := e.inboxTotal(t); n != 0 {
		t.Errorf("inbox holds %d messages, want none", n)
	}
}

// A round with more group messages than are published one by one writes
// them as an atomic batch on GROUP_LOG, next to its own atomic batch on
// INBOX (an atomic batch spans one stream): nothing is rejected and retried
// one by one, and each group's log holds its messages in CHAT_IN order.
func TestGroupAtomicBatch(t *testing.T) {
	l := &lister{groups: map[schema.GroupID][]schema.UserID{
		"team":  users("alice", "bob", "carol"),
		"other": users("bob", "carol"),
	}}
	logs := &testlog.Buffer{}
	e := newEnv(t, 100, Config{Groups: l, Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	var entries [][]byte
	var team, other []*schema.Message
	// smallBatch+1 messages of each kind: both streams get an atomic batch.
	for i := range 3 * (smallBatch + 1) {
		var m *schema.Message
		switch i % 3 {
		case 0:
			m = msg("alice", "team", fmt.Sprintf("t%d", i), schema.ChannelGroup)
			team = append(team, m)
		case 1:
			m = msg("bob", "other", fmt.Sprintf("o%d", i), schema.ChannelGroup)
			other = append(other, m)
		default:
			m = msg("carol", "dave", fmt.Sprintf("d%d", i), schema.ChannelIndividual)
		}
		entries = append(entries, m.MarshalProto())
	}
	e.publishBatch(t, entries...)
	e.start(t)
	e.waitChatInEmpty(t)

	for g, want := range map[schema.GroupID][]*schema.Message{"team": team, "other": other} {
		got := e.groupLog(t, g)
		if len(got) != len(want) {
			t.Fatalf("group log of %s holds %d messages, want %d", g, len(got), len(want))
		}
		for i, m := range want {
			wantGroupCopy(t, got[i], m, m.MarshalProto())
		}
	}
	if n := len(e.inbox(t, "dave")); n != smallBatch+1 {
		t.Errorf("dave has %d messages, want %d", n, smallBatch+1)
	}
	if n := e.inboxTotal(t); n != smallBatch+1 {
		t.Errorf("inbox holds %d messages, want only dave's %d", n, smallBatch+1)
	}
	if s := logs.String(); strings.Contains(s, "atomic batch rejected") {
		t.Errorf("an atomic batch was rejected:\n%s", s)
	}
}

func TestGroupWithoutLister(t *testing.T) {
	e := newEnv(t, 100, Config{})
	e.start(t)
	m := msg("alice", "team", "nolister", schema.ChannelGroup)
	e.publishIn(t, m)
	got := e.waitInbox(t, "alice", 1)
	e.waitChatInEmpty(t)
	wantNotice(t, got[0], "alice", m.ID, schema.CodeUnknownGroup)
	if n := e.groupLogTotal(t); n != 0 {
		t.Errorf("group log holds %d messages, want none", n)
	}
}

func TestBadDestination(t *testing.T) {
	e := newEnv(t, 100, Config{})
	e.start(t)
	m := msg("alice", "bob.*", "bad", schema.ChannelIndividual)
	e.publishIn(t, m)
	got := e.waitInbox(t, "alice", 1)
	e.waitChatInEmpty(t)
	wantNotice(t, got[0], "alice", m.ID, schema.CodeBadTo)
	if n := e.inboxTotal(t); n != 1 {
		t.Errorf("inbox holds %d messages, want 1", n)
	}
}

func TestGroupLookupRetried(t *testing.T) {
	l := &lister{groups: map[schema.GroupID][]schema.UserID{"team": users("alice", "bob")}, fails: 1}
	e := newEnv(t, 100, Config{Groups: l})
	e.start(t)
	m := msg("alice", "team", "retry", schema.ChannelGroup)
	sent := e.publishIn(t, m)
	got := e.waitGroupLog(t, "team", 1)
	e.waitChatInEmpty(t)
	if len(got) != 1 {
		t.Fatalf("group log holds %d messages, want 1", len(got))
	}
	wantGroupCopy(t, got[0], m, sent)
	if c := l.callCount(); c != 2 {
		t.Errorf("lister called %d times, want 2 (one failure, one retry)", c)
	}
	if n := e.inboxTotal(t); n != 0 {
		t.Errorf("inbox holds %d messages, want none (no member copies, no notice)", n)
	}
}

// A direct message to a full inbox is answered with inbox_full; the other
// messages of the round are stored. A group message never is: it goes to the
// group's log, which drops its oldest messages instead of refusing, whatever
// the state of the members' inboxes.
func TestInboxFull(t *testing.T) {
	l := &lister{groups: map[schema.GroupID][]schema.UserID{"team": users("alice", "bob", "carol")}}
	e := newEnv(t, 2, Config{Groups: l})
	// bob's inbox is at its cap.
	for i := range 2 {
		if _, err := e.js.Publish(context.Background(), schema.UserInbox("bob"), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	grp := msg("alice", "team", "full-1", schema.ChannelGroup)
	toBob := msg("dave", "bob", "full-2", schema.ChannelIndividual)
	toCarol := msg("dave", "carol", "full-3", schema.ChannelIndividual)
	grpSent := e.publishIn(t, grp)
	e.publishIn(t, toBob)
	sent := e.publishIn(t, toCarol)
	e.start(t)
	e.waitChatInEmpty(t)

	team := e.groupLog(t, "team")
	if len(team) != 1 {
		t.Fatalf("group log holds %d messages, want 1", len(team))
	}
	wantGroupCopy(t, team[0], grp, grpSent)
	carol := e.inbox(t, "carol")
	if len(carol) != 1 || !bytes.Equal(carol[0].Data, sent) {
		t.Errorf("carol has %d messages, want only dave's", len(carol))
	}
	if n := len(e.inbox(t, "bob")); n != 2 {
		t.Errorf("bob has %d messages, want his 2 old ones", n)
	}
	if n := len(e.inbox(t, "alice")); n != 0 {
		t.Errorf("alice has %d messages, want none (no inbox_full for a group message)", n)
	}
	dave := e.inbox(t, "dave")
	if len(dave) != 1 {
		t.Fatalf("dave has %d messages, want 1 notice", len(dave))
	}
	wantNotice(t, dave[0], "dave", toBob.ID, schema.CodeInboxFull)
}

func TestPoisonTerminated(t *testing.T) {
	e := newEnv(t, 100, Config{})
	ctx := context.Background()
	terms, err := e.nc.SubscribeSync("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED." + schema.StreamChatIn + "." + ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	defer terms.Unsubscribe()
	tests := []struct {
		name string
		from schema.UserID
		data []byte
	}{
		{name: "undecodable", from: "alice", data: []byte{0xff, 0xff, 0xff}},
		{name: "source does not match subject", from: "alice",
			data: msg("mallory", "bob", "spoof", schema.ChannelIndividual).MarshalProto()},
	}
	for i, tc := range tests {
		e.publishRaw(t, tc.from, fmt.Sprintf("poison-%d", i), tc.data)
	}
	e.start(t)
	// A good message after the poison ones is still routed.
	e.publishIn(t, msg("alice", "bob", "after", schema.ChannelIndividual))
	e.waitInbox(t, "bob", 1)
	for range tests {
		if _, err := terms.NextMsg(10 * time.Second); err != nil {
			t.Fatalf("terminated advisory: %v", err)
		}
	}
	cons, err := e.js.Consumer(ctx, schema.StreamChatIn, ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.NumRedelivered != 0 || info.NumAckPending != 0 || info.NumPending != 0 || info.Delivered.Consumer != 3 {
		t.Errorf("consumer: redelivered %d ack pending %d pending %d delivered %d, want 3 single deliveries",
			info.NumRedelivered, info.NumAckPending, info.NumPending, info.Delivered.Consumer)
	}
	if n := e.inboxTotal(t); n != 1 {
		t.Errorf("inbox holds %d messages, want 1", n)
	}
}

func TestClientAckDropped(t *testing.T) {
	e := newEnv(t, 100, Config{})
	e.start(t)
	ack := msg("alice", "bob", "ack-1", schema.ChannelIndividual)
	ack.Type = schema.TypeClientAck
	e.publishIn(t, ack)
	e.publishIn(t, msg("alice", "bob", "after-ack", schema.ChannelIndividual))
	got := e.waitInbox(t, "bob", 1)
	e.waitChatInEmpty(t)
	if len(got) != 1 || decode(t, got[0].Data).ID != "after-ack" {
		t.Errorf("bob's inbox: %d messages, want only the message after the ack", len(got))
	}
}

func TestOrdering(t *testing.T) {
	const n = 1000
	e := newEnv(t, 10000, Config{})
	e.start(t)
	ids := make([]string, n)
	for i := range n {
		ids[i] = fmt.Sprintf("ord-%04d", i)
		e.publishIn(t, msg("alice", "bob", ids[i], schema.ChannelIndividual))
	}
	got := e.waitInbox(t, "bob", n)
	if len(got) != n {
		t.Fatalf("bob has %d messages, want %d", len(got), n)
	}
	for i, raw := range got {
		if id := decode(t, raw.Data).ID; id != ids[i] {
			t.Fatalf("message %d is %s, want %s", i, id, ids[i])
		}
	}
}

func TestEphemeral(t *testing.T) {
	l := &lister{groups: map[schema.GroupID][]schema.UserID{
		"team":  users("alice", "bob", "carol"),
		"other": users("bob", "carol"),
	}}
	tests := []struct {
		name    string
		to      string
		ch      schema.Channel
		chatIn  bool                  // published to CHAT_IN instead of msg.live
		receive map[schema.UserID]int // 1: must receive, 0: must not
	}{
		{name: "live 1:1", to: "bob", ch: schema.ChannelIndividual, receive: map[schema.UserID]int{"bob": 1, "alice": 0}},
		{name: "live group", to: "team", ch: schema.ChannelGroup, receive: map[schema.UserID]int{"bob": 1, "carol": 1, "alice": 0}},
		{name: "live group non-member", to: "other", ch: schema.ChannelGroup, receive: map[schema.UserID]int{"bob": 0, "carol": 0}},
		{name: "chat_in 1:1", to: "bob", ch: schema.ChannelIndividual, chatIn: true, receive: map[schema.UserID]int{"bob": 1}},
		{name: "chat_in group", to: "team", ch: schema.ChannelGroup, chatIn: true, receive: map[schema.UserID]int{"bob": 1, "carol": 1, "alice": 0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 100, Config{Groups: l})
			subs := map[schema.UserID]*nats.Subscription{}
			for u := range tc.receive {
				sub, err := e.nc.SubscribeSync(schema.Deliver(u))
				if err != nil {
					t.Fatal(err)
				}
				defer sub.Unsubscribe()
				subs[u] = sub
			}
			if err := e.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			e.start(t)
			e.waitLiveSubscribed(t)
			m := msg("alice", tc.to, "eph-"+tc.name, tc.ch)
			m.Ephemeral = true
			data := m.MarshalProto()
			if tc.chatIn {
				e.publishRaw(t, "alice", m.ID, data)
				e.waitChatInEmpty(t)
			} else if err := e.nc.Publish(schema.Live("alice"), data); err != nil {
				t.Fatal(err)
			}
			// A marker to each user, routed after m, bounds the wait
			// for copies that must not arrive.
			for u := range tc.receive {
				marker := msg("alice", string(u), "marker", schema.ChannelIndividual)
				marker.Ephemeral = true
				if err := e.nc.Publish(schema.Live("alice"), marker.MarshalProto()); err != nil {
					t.Fatal(err)
				}
			}
			for u, want := range tc.receive {
				got := 0
				for {
					raw, err := subs[u].NextMsg(10 * time.Second)
					if err != nil {
						t.Fatalf("%s: %v", u, err)
					}
					if bytes.Equal(raw.Data, data) {
						got++
						continue
					}
					if decode(t, raw.Data).ID == "marker" {
						break
					}
					t.Fatalf("%s received an unexpected message", u)
				}
				if got != want {
					t.Errorf("%s received %d copies, want %d", u, got, want)
				}
			}
			if n, g := e.inboxTotal(t), e.groupLogTotal(t); n != 0 || g != 0 {
				t.Errorf("inbox holds %d messages and the group log %d, want none", n, g)
			}
		})
	}
}

// waitLiveSubscribed waits until the router's msg.live.* subscription is
// registered (Run subscribes asynchronously; a core message published
// before that is lost, as ephemeral messages may be).
func (e *env) waitLiveSubscribed(t testing.TB) {
	t.Helper()
	e.poll(t, "router subscribed to msg.live.*", func() (bool, string) {
		sz, err := e.srv.Subsz(&server.SubszOptions{Subscriptions: true, Test: schema.Live("alice")})
		if err != nil {
			return false, err.Error()
		}
		return len(sz.Subs) > 0, "no subscription"
	})
}

func TestRecipients(t *testing.T) {
	tests := []struct {
		name    string
		members []schema.UserID
		sender  schema.UserID
		want    []schema.UserID
		wantErr error
	}{
		{name: "all but sender", members: users("a", "b", "c"), sender: "b", want: users("a", "c")},
		{name: "duplicates removed in order", members: users("c", "a", "c", "b", "a", "a"), sender: "a", want: users("c", "b")},
		{name: "invalid ids skipped", members: users("a", "x.y", "*", "b"), sender: "a", want: users("b")},
		{name: "alone", members: users("a"), sender: "a", want: []schema.UserID{}},
		{name: "not a member", members: users("b", "c"), sender: "a", wantErr: errNotMember},
		{name: "empty group", members: nil, sender: "a", wantErr: errNotMember},
		{name: "unknown group", sender: "a", wantErr: errUnknownGroup},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := &lister{groups: map[schema.GroupID][]schema.UserID{}}
			if !errors.Is(tc.wantErr, errUnknownGroup) {
				l.groups["g"] = tc.members
			}
			r := &Router{log: slog.New(slog.DiscardHandler), groups: l}
			cache := make(groupCache)
			for range 2 { // the second call is answered from the cache
				got, err := r.recipients(context.Background(), cache, "g", tc.sender)
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if !slices.Equal(got, tc.want) {
					t.Errorf("recipients = %v, want %v", got, tc.want)
				}
			}
			if c := l.callCount(); c != 1 {
				t.Errorf("lister called %d times, want 1", c)
			}
		})
	}
}

func TestRetryDelay(t *testing.T) {
	tests := []struct {
		delivered uint64
		want      time.Duration
	}{
		{0, time.Second}, {1, time.Second}, {2, 2 * time.Second}, {3, 4 * time.Second},
		{6, 32 * time.Second}, {7, time.Minute}, {8, time.Minute}, {1 << 40, time.Minute},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprint(tc.delivered), func(t *testing.T) {
			if got := retryDelay(tc.delivered); got != tc.want {
				t.Errorf("retryDelay(%d) = %v, want %v", tc.delivered, got, tc.want)
			}
		})
	}
}

// A pipelined round tells each copy's fate apart: stored, duplicate
// (stored earlier, success), a full inbox, and a subject no stream takes.
func TestPublishEach(t *testing.T) {
	e := newEnv(t, 2, Config{Groups: &lister{}})
	ctx := context.Background()
	for i := range 2 { // bob's inbox is at its cap
		if _, err := e.js.Publish(ctx, schema.UserInbox("bob"), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	mk := func(subject, id string) out {
		m := nats.NewMsg(subject)
		m.Data = []byte(id)
		m.Header.Set(jetstream.MsgIDHeader, id)
		return out{msg: m}
	}
	outs := []out{
		mk(schema.UserInbox("carol"), "c1"),
		mk(schema.UserInbox("bob"), "b1"),
		mk(schema.UserInbox("carol"), "c1"), // a resend
		mk("nostream.here", "x1"),
		mk(schema.UserInbox("carol"), "c2"),
	}
	got := e.r.publishEach(ctx, outs)
	want := []result{stored, full, stored, transient, stored}
	if !slices.Equal(got, want) {
		t.Fatalf("results %v, want %v", got, want)
	}
	carol := e.inbox(t, "carol")
	if len(carol) != 2 || string(carol[0].Data) != "c1" || string(carol[1].Data) != "c2" {
		t.Fatalf("carol's inbox: %d messages, want c1 then c2", len(carol))
	}
}

// A router stopped while messages stream in finishes what it had already
// received: nothing is left delivered but unacked, to wait out the ack
// wait after a restart, and the next router routes the rest.
func TestStopRoutesWhatWasReceived(t *testing.T) {
	e := newEnv(t, 10_000, Config{Batch: 16})
	const n = 2000
	for i := range n {
		e.publishIn(t, msg(fmt.Sprintf("s%d", i%10), "bob", fmt.Sprintf("m%d", i), schema.ChannelIndividual))
	}
	stop := e.start(t)
	e.poll(t, "routing under way", func() (bool, string) {
		got := e.inboxTotal(t)
		return got > 0, fmt.Sprintf("%d routed", got)
	})
	stop() // mid-stream: n messages take many rounds of 16
	c, err := e.js.Consumer(context.Background(), schema.StreamChatIn, ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.NumAckPending != 0 || info.NumRedelivered != 0 {
		t.Fatalf("after stop: %d delivered but unacked, %d redelivered (%d of %d routed)",
			info.NumAckPending, info.NumRedelivered, e.inboxTotal(t), n)
	}
	if got := e.inboxTotal(t); got == n {
		t.Logf("all %d routed before the stop took effect", n)
	}
	// What was left is routed by the next router.
	e.start(t)
	e.poll(t, "all routed", func() (bool, string) {
		got := e.inboxTotal(t)
		return got == n, fmt.Sprintf("%d of %d routed", got, n)
	})
}

// A router whose consumer is deleted under it fails instead of idling.
func TestRunFailsWhenConsumerDeleted(t *testing.T) {
	e := newEnv(t, 100, Config{})
	done := make(chan error, 1)
	go func() { done <- e.r.Run(context.Background()) }()
	e.publishIn(t, msg("alice", "bob", "m1", schema.ChannelIndividual))
	e.waitInbox(t, "bob", 1)
	if err := e.js.DeleteConsumer(context.Background(), schema.StreamChatIn, ConsumerName); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("run returned nil after its consumer was deleted")
		}
		t.Logf("run: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("run did not return after its consumer was deleted")
	}
}
