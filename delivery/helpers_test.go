package delivery

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

// leakCheck verifies at the very end of the test (after the server and
// connections are closed) that no goroutine started during it is left.
func leakCheck(t *testing.T) {
	t.Helper()
	opts := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opts) })
}

// testSink records what a session delivers.
type testSink struct {
	mu     sync.Mutex
	got    []*schema.Message
	limit  int           // Deliver refuses once this many were accepted; 0 = no limit
	gate   chan struct{} // if set, the first Deliver waits for it (stalls the session's worker; see TestSessionQueueOverflowRepaired)
	code   int
	reason string
	closes int
	acked  int // acks the test sent (for the window invariant)
	maxOut int // highest delivered-minus-acked seen
	// flushes counts Flush calls; flushedAt is len(got) at the last one.
	flushes, flushedAt int
}

func (k *testSink) Flush() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.flushes++
	k.flushedAt = len(k.got)
}

func (k *testSink) flushState() (n, at int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.flushes, k.flushedAt
}

func (k *testSink) Deliver(m *schema.Message) bool {
	k.mu.Lock()
	g := k.gate
	k.gate = nil
	k.mu.Unlock()
	if g != nil {
		<-g
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.limit > 0 && len(k.got) >= k.limit {
		return false
	}
	k.got = append(k.got, m)
	k.maxOut = max(k.maxOut, len(k.got)-k.acked)
	return true
}

func (k *testSink) Close(code int, reason string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.code, k.reason = code, reason
	k.closes++
}

func (k *testSink) ids() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]string, len(k.got))
	for i, m := range k.got {
		out[i] = m.ID
	}
	return out
}

func (k *testSink) len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.got)
}

func (k *testSink) count(id string) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, m := range k.got {
		if m.ID == id {
			n++
		}
	}
	return n
}

func (k *testSink) closed() (code, n int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.code, k.closes
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitIDs waits until sink has received exactly want (in order).
func waitIDs(t testing.TB, k *testSink, want []string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d messages", len(want)), func() bool { return k.len() >= len(want) })
	if got := k.ids(); !slices.Equal(got, want) {
		t.Fatalf("delivered %v\nwant      %v", got, want)
	}
}

type env struct {
	srv *natstest.Server
	nc  *nats.Conn
	js  jetstream.JetStream
	svc *Service
	// stop cancels Run and waits for it.
	stop func()
}

// startService creates, sets up and runs a Service on srv with its own
// connection. tweak may change knobs before Setup.
func startService(t testing.TB, srv *natstest.Server, cfg Config, tweak func(*Service)) *env {
	t.Helper()
	if cfg.JS == nil {
		_, cfg.JS = srv.JetStream(t)
	}
	js := cfg.JS
	nc := js.Conn()
	svc, err := New(cfg)
	if err != nil {
		t.Fatalf("new: %v", err)
	}
	if tweak != nil {
		tweak(svc)
	}
	if err := svc.Setup(t.Context()); err != nil {
		t.Fatalf("setup: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	waitFor(t, "run", func() bool {
		svc.mu.RLock()
		defer svc.mu.RUnlock()
		return svc.running
	})
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return &env{srv: srv, nc: nc, js: js, svc: svc, stop: stop}
}

// newEnv starts a fresh server and a Service on it.
func newEnv(t *testing.T, cfg Config, tweak func(*Service)) *env {
	t.Helper()
	leakCheck(t)
	return startService(t, natstest.Start(t), cfg, tweak)
}

func testMsg(user schema.UserID, id string) *schema.Message {
	return &schema.Message{
		Version:     2.1,
		ID:          id,
		Type:        schema.TypeMessage,
		Channel:     schema.ChannelIndividual,
		Source:      "sender",
		Destination: string(user),
		Content:     []byte(`"hello ` + id + `"`),
		Timestamp:   uint64(time.Now().UnixMilli()),
	}
}

func natsMsg(user schema.UserID, id string) *nats.Msg {
	return &nats.Msg{Subject: schema.UserInbox(user), Data: testMsg(user, id).MarshalProto()}
}

// publish stores a message for user in INBOX the way the router does and
// returns its stream sequence.
func (e *env) publish(t testing.TB, user schema.UserID, id string) uint64 {
	t.Helper()
	ack, err := e.js.PublishMsg(t.Context(), natsMsg(user, id))
	if err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
	return ack.Sequence
}

// publishN publishes ids prefix1..prefixN (pipelined, in order) and returns
// the ids.
func (e *env) publishN(t testing.TB, user schema.UserID, prefix string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for lo := 0; lo < n; lo += 1000 {
		hi := min(lo+1000, n)
		futs := make([]jetstream.PubAckFuture, 0, hi-lo)
		for i := lo; i < hi; i++ {
			ids[i] = prefix + strconv.Itoa(i+1)
			f, err := e.js.PublishMsgAsync(natsMsg(user, ids[i]))
			if err != nil {
				t.Fatalf("publish %s: %v", ids[i], err)
			}
			futs = append(futs, f)
		}
		for i, f := range futs {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				t.Fatalf("publish %s: %v", ids[lo+i], err)
			case <-time.After(15 * time.Second):
				t.Fatalf("publish %s: timeout", ids[lo+i])
			}
		}
	}
	return ids
}

func (e *env) open(t testing.TB, user schema.UserID, device schema.DeviceID, k *testSink) *Session {
	t.Helper()
	ss, err := e.svc.Open(t.Context(), user, device, k)
	if err != nil {
		t.Fatalf("open %s/%s: %v", user, device, err)
	}
	return ss
}

// stored returns how many messages of user the INBOX holds.
func (e *env) stored(t testing.TB, user schema.UserID) uint64 {
	t.Helper()
	st, err := e.js.Stream(t.Context(), schema.StreamInbox)
	if err != nil {
		t.Fatalf("stream: %v", err)
	}
	subj := schema.UserInbox(user)
	info, err := st.Info(t.Context(), jetstream.WithSubjectFilter(subj))
	if err != nil {
		t.Fatalf("stream info: %v", err)
	}
	return info.State.Subjects[subj]
}

// cursorOf returns the stored cursor document of user.
func (e *env) cursorOf(t testing.TB, user schema.UserID) *cursorDoc {
	t.Helper()
	a, err := e.svc.getAssets()
	if err != nil {
		t.Fatal(err)
	}
	d, _, err := cas(t.Context(), e.svc.log, a.cursors, schema.Token(user), func(*cursorDoc, bool) casOp { return casNone })
	if err != nil {
		t.Fatalf("cursor: %v", err)
	}
	return d
}

func seqIDs(prefix string, from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, prefix+strconv.Itoa(i))
	}
	return out
}
