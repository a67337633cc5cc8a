package delivery

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

func TestNewValidates(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.JetStream(t)
	cases := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"defaults", Config{JS: js}, true},
		{"no jetstream", Config{}, false},
		{"node with dot", Config{JS: js, Node: "a.b"}, false},
		{"negative window", Config{JS: js, MaxInFlight: -1}, false},
		{"too many replicas", Config{JS: js, Replicas: 7}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.cfg)
			if (err == nil) != tc.ok {
				t.Fatalf("New err = %v, want ok=%v", err, tc.ok)
			}
			if tc.ok && (s.cfg.MaxInFlight != 256 || s.cfg.Retention != 30*24*time.Hour || !schema.ValidNode(s.Node())) {
				t.Fatalf("defaults not filled: %+v", s.cfg)
			}
		})
	}
}

func TestSetupIdempotentAndFullInboxRejects(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.JetStream(t)
	s, err := New(Config{JS: js, MaxPerUser: 3, Retention: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := s.Setup(t.Context()); err != nil {
			t.Fatalf("setup: %v", err)
		}
	}
	st, err := js.Stream(t.Context(), schema.StreamInbox)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	if cfg.Discard != jetstream.DiscardNew || !cfg.DiscardNewPerSubject || cfg.MaxMsgsPerSubject != 3 ||
		!cfg.AllowDirect || cfg.RePublish == nil || cfg.RePublish.Destination != schema.SubjectDeliverRepub ||
		cfg.MaxConsumers != 64 || cfg.MaxAge != time.Hour {
		t.Fatalf("unexpected INBOX config: %+v", cfg)
	}
	e := &env{js: js}
	e.publishN(t, "bob", "m", 3)
	_, err = js.PublishMsg(t.Context(), natsMsg("bob", "m4"))
	if err == nil {
		t.Fatal("a full inbox accepted a fourth message")
	}
	if got := e.stored(t, "bob"); got != 3 {
		t.Fatalf("stored %d, want the first 3 kept", got)
	}
}

func TestCatchUpInOrder(t *testing.T) {
	cases := []struct {
		name    string
		backlog int
		window  int
	}{
		{"empty inbox", 0, 256},
		{"small backlog", 5, 256},
		{"backlog over several batches", 700, 1000},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{MaxInFlight: tc.window}, nil)
			want := e.publishN(t, "bob", "m", tc.backlog)
			e.publishN(t, "carol", "x", 3) // another user's inbox must not leak in
			k := &testSink{}
			e.open(t, "bob", "phone", k)
			e.publish(t, "bob", "live")
			waitIDs(t, k, append(want, "live"))
		})
	}
}

func TestLiveDeliveryDuringCatchUp(t *testing.T) {
	e := newEnv(t, Config{MaxInFlight: 1000}, nil)
	before := e.publishN(t, "bob", "a", 200)
	k := &testSink{}
	e.open(t, "bob", "phone", k)
	after := e.publishN(t, "bob", "b", 200) // races with the catch-up read
	waitIDs(t, k, append(before, after...))
}

func TestGapRepair(t *testing.T) {
	cases := []struct {
		name      string
		sweep     time.Duration
		nextAfter bool // publish one more message after the drops
	}{
		{"next message reveals the gap", time.Hour, true},
		{"drop sweep repairs without a next message", 20 * time.Millisecond, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{}, func(s *Service) {
				s.liveBuffer = 1
				s.dropSweep = tc.sweep
			})
			k := &testSink{}
			e.open(t, "bob", "phone", k)
			e.publish(t, "bob", "m0")
			waitIDs(t, k, []string{"m0"})

			e.svc.mu.RLock()
			sub := e.svc.users["bob"].sub
			ch := e.svc.liveCh
			e.svc.mu.RUnlock()
			// m0 may have come by the catch-up read with its live copy
			// still on the way: let it reach the dispatcher first, or the
			// dispatcher stalls on m0 below and m1 never leaves the channel.
			// (The republish is queued before the PubAck, so a round trip
			// on the service's connection brings it in.)
			if err := e.svc.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "m0's live copy taken", func() bool { return len(ch) == 0 })

			// Stall the dispatcher: it takes m1 and blocks on the lock; m2
			// fills the one-slot channel; m3..m5 are dropped by the client.
			e.svc.mu.Lock()
			unlock := sync.OnceFunc(e.svc.mu.Unlock)
			defer unlock() // a failure below must not leave the service locked (its shutdown would hang)
			flush := func() {
				if err := e.svc.nc.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			e.publish(t, "bob", "m1")
			flush() // m1 is in the channel or taken
			waitFor(t, "dispatcher to take m1", func() bool { return len(ch) == 0 })
			for _, id := range []string{"m2", "m3", "m4", "m5"} {
				e.publish(t, "bob", id) // the PubAck arrives after the republish was handled
			}
			flush() // the client library has handled (or dropped) m2..m5
			dropped, err := sub.Dropped()
			unlock()
			if err != nil || dropped != 3 {
				t.Fatalf("dropped = %d, %v; want 3 (test setup)", dropped, err)
			}
			want := []string{"m0", "m1", "m2", "m3", "m4", "m5"}
			if tc.nextAfter {
				waitIDs(t, k, []string{"m0", "m1", "m2"})
				e.publish(t, "bob", "m6")
				want = append(want, "m6")
			}
			waitIDs(t, k, want)
		})
	}
}

// A session whose live queue overflowed re-reads the stream, counted as
// lagging (see Service.Overloaded) until it has caught up.
func TestSessionQueueOverflowRepaired(t *testing.T) {
	e := newEnv(t, Config{}, func(s *Service) { s.queueMsgs = 2; s.dropSweep = time.Hour; s.laggingHigh = 1 })
	gate := make(chan struct{})
	release := sync.OnceFunc(func() { close(gate) })
	t.Cleanup(release) // a failure must not leave the session stalled
	k := &testSink{gate: gate}
	// m1 is stored before the session opens, so its worker (the catch-up
	// read) delivers it and stalls there; live messages then queue.
	e.publish(t, "bob", "m1")
	e.open(t, "bob", "phone", k)
	ids := e.publishN(t, "bob", "n", 6)
	e.svc.mu.RLock()
	ch := e.svc.liveCh
	e.svc.mu.RUnlock()
	waitFor(t, "dispatcher to drain", func() bool { return len(ch) == 0 })
	if e.svc.Overloaded() || testutil.ToFloat64(e.svc.metrics.fellBehind) != 0 {
		t.Fatal("fell behind before the session saw its queue overflow")
	}
	release()
	waitIDs(t, k, append([]string{"m1"}, ids...))
	waitFor(t, "caught up", func() bool { return e.svc.lagging.Load() == 0 && !e.svc.Overloaded() })
	if n := testutil.ToFloat64(e.svc.metrics.fellBehind); n != 1 {
		t.Fatalf("fell behind %v times, want 1", n)
	}
	// Counted while it lasts.
	e.svc.lagging.Add(1)
	if !e.svc.Overloaded() {
		t.Fatal("not overloaded with a lagging session at laggingHigh 1")
	}
	e.svc.lagging.Add(-1)
}

func TestTwoDevicesIndependent(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	a, b := &testSink{}, &testSink{}
	sa := e.open(t, "bob", "phone", a)
	sb := e.open(t, "bob", "laptop", b)
	ids := e.publishN(t, "bob", "m", 5)
	waitIDs(t, a, ids)
	waitIDs(t, b, ids)
	sa.Ack(ids...)
	sa.Close()
	sb.Close()

	a2, b2 := &testSink{}, &testSink{}
	e.open(t, "bob", "phone", a2)
	e.open(t, "bob", "laptop", b2)
	e.publish(t, "bob", "m6")
	waitIDs(t, a2, []string{"m6"})
	waitIDs(t, b2, append(ids, "m6"))
}

func TestAckAndReconnect(t *testing.T) {
	all := seqIDs("m", 1, 5)
	cases := []struct {
		name  string
		ack   []string
		again []string // delivered on the next connection
	}{
		{"all acked: nothing again", all, nil},
		{"none acked: everything again", nil, all},
		{"acked out of order: only the rest again", []string{"m2", "m4", "m5"}, []string{"m1", "m3"}},
		{"prefix acked: the rest again", []string{"m1", "m2"}, []string{"m3", "m4", "m5"}},
		{"unknown id: no effect", []string{"zz"}, all},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{}, nil)
			e.publishN(t, "bob", "m", 5)
			k := &testSink{}
			ss := e.open(t, "bob", "phone", k)
			waitIDs(t, k, all)
			ss.Ack(tc.ack...)
			ss.Close()

			k2 := &testSink{}
			e.open(t, "bob", "phone", k2)
			e.publish(t, "bob", "end")
			waitIDs(t, k2, append(slices.Clone(tc.again), "end"))
		})
	}
}

// Messages read from a stream (catch-up, redelivery) are followed by a
// Flush of the sink, so a gateway holding frames to share writes sends
// them at once; live messages are not.
func TestFlushAfterStreamReads(t *testing.T) {
	e := newEnv(t, Config{AckTimeout: time.Second}, nil)
	want := e.publishN(t, "bob", "m", 5)
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, want)
	waitFor(t, "a flush after the catch-up", func() bool { _, at := k.flushState(); return at == 5 })
	ss.Ack(want...)
	n, _ := k.flushState()

	e.publish(t, "bob", "live")
	waitIDs(t, k, append(want, "live"))
	if got, _ := k.flushState(); got != n {
		t.Fatalf("a live message flushed the sink (%d flushes, %d before)", got, n)
	}
	waitFor(t, "live redelivered", func() bool { return k.count("live") >= 2 })
	waitFor(t, "a flush after the redelivery", func() bool { got, at := k.flushState(); return got > n && at >= 7 })
}

func TestAckTimeoutRedelivery(t *testing.T) {
	e := newEnv(t, Config{AckTimeout: 150 * time.Millisecond}, nil)
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	e.publish(t, "bob", "m1")
	e.publish(t, "bob", "m2")
	waitIDs(t, k, []string{"m1", "m2"})
	ss.Ack("m1")
	waitFor(t, "m2 redelivered twice", func() bool { return k.count("m2") >= 3 })
	if n := k.count("m1"); n != 1 {
		t.Fatalf("acked m1 delivered %d times", n)
	}
	ss.Ack("m2")
	// After the ack, at most one redelivery that was already under way.
	n := k.count("m2")
	e.publish(t, "bob", "m3")
	waitFor(t, "m3", func() bool { return k.count("m3") == 1 })
	ss.Close()
	if got := k.count("m2"); got > n+1 {
		t.Fatalf("m2 redelivered after its ack: %d -> %d", n, got)
	}
}

func TestInFlightWindow(t *testing.T) {
	const window = 10
	e := newEnv(t, Config{MaxInFlight: window}, nil)
	ids := e.publishN(t, "bob", "m", 35)
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, ids[:window])
	ids = append(ids, seqIDs("live", 1, 3)...)
	e.publishN(t, "bob", "live", 3) // arrive while the window is full
	for acked := 0; acked < len(ids); {
		waitFor(t, "window refill", func() bool { return k.len() >= min(acked+window, len(ids)) })
		batch := k.ids()[acked:]
		k.mu.Lock()
		k.acked += len(batch)
		k.mu.Unlock()
		ss.Ack(batch...)
		acked += len(batch)
	}
	waitIDs(t, k, ids)
	k.mu.Lock()
	maxOut := k.maxOut
	k.mu.Unlock()
	if maxOut > window {
		t.Fatalf("%d unacked messages outstanding, window is %d", maxOut, window)
	}
}

func TestSlowConsumer(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	ids := e.publishN(t, "bob", "m", 10)
	k := &testSink{limit: 3}
	e.open(t, "bob", "phone", k)
	waitFor(t, "slow consumer close", func() bool { c, _ := k.closed(); return c == CloseSlowConsumer })
	waitFor(t, "session end", func() bool { return e.svc.Sessions() == 0 })
	if _, n := k.closed(); n != 1 {
		t.Fatalf("sink closed %d times", n)
	}
	k2 := &testSink{}
	e.open(t, "bob", "phone", k2)
	waitIDs(t, k2, ids)
}

func TestReplace(t *testing.T) {
	cases := []struct {
		name      string
		otherNode bool
	}{
		{"same node", false},
		{"other node", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{Node: "n1"}, nil)
			e2 := e
			if tc.otherNode {
				e2 = startService(t, e.srv, Config{Node: "n2"}, nil)
			}
			k1, k2 := &testSink{}, &testSink{}
			e.open(t, "bob", "phone", k1)
			e2.open(t, "bob", "phone", k2)
			waitFor(t, "old session closed", func() bool { c, _ := k1.closed(); return c == CloseReplaced })
			waitFor(t, "old session gone", func() bool {
				n := e.svc.Sessions()
				if tc.otherNode {
					n += e2.svc.Sessions()
				}
				return n == 1
			})
			if c, _ := k2.closed(); c != 0 {
				t.Fatalf("new session closed with %d", c)
			}
			e.publish(t, "bob", "m1")
			waitIDs(t, k2, []string{"m1"})
			if k1.len() != 0 {
				t.Fatalf("replaced session got %v", k1.ids())
			}
		})
	}
}

func TestKick(t *testing.T) {
	cases := []struct {
		name       string
		reason     string
		forgotten  bool
		wantStored uint64
	}{
		// laptop acked everything; once phone is forgotten nothing is pending.
		{"logout forgets the device", KickLogout, true, 0},
		{"key replaced keeps the cursor", KickKeyReplaced, false, 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{}, nil)
			phone, laptop := &testSink{}, &testSink{}
			e.open(t, "bob", "phone", phone)
			sl := e.open(t, "bob", "laptop", laptop)
			ids := e.publishN(t, "bob", "m", 3)
			waitIDs(t, laptop, ids)
			sl.Ack(ids...)
			sl.Close()

			payload, _ := json.Marshal(kickMsg{Reason: tc.reason})
			if err := e.nc.Publish(schema.Kick("bob", "phone"), payload); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "kicked session closed", func() bool { c, _ := phone.closed(); return c == CloseLoggedOut })
			waitFor(t, "cursor state", func() bool {
				_, ok := e.cursorOf(t, "bob").Devices["phone"]
				return ok != tc.forgotten
			})
			waitFor(t, "inbox state", func() bool { return e.stored(t, "bob") == tc.wantStored })
		})
	}
}

func TestStaleReplaceKickIgnored(t *testing.T) {
	e := newEnv(t, Config{Node: "n1"}, nil)
	phone, laptop := &testSink{}, &testSink{}
	e.open(t, "bob", "laptop", laptop) // presence revision 1
	sp := e.open(t, "bob", "phone", phone)
	kick := func(device schema.DeviceID, k kickMsg) {
		t.Helper()
		b, _ := json.Marshal(k)
		if err := e.nc.Publish(schema.Kick("bob", device), b); err != nil {
			t.Fatal(err)
		}
	}
	// A replace kick from a session older than phone's (lower presence
	// revision), e.g. delayed on another node, must not close it. Kicks are
	// handled in order, so once laptop is closed the first one was seen.
	kick("phone", kickMsg{Reason: KickReplaced, Session: "older", Node: "n9", Rev: sp.rev.Load() - 1})
	kick("laptop", kickMsg{Reason: KickKeyReplaced})
	waitFor(t, "laptop closed", func() bool { c, _ := laptop.closed(); return c == CloseLoggedOut })
	if c, n := phone.closed(); n != 0 {
		t.Fatalf("stale kick closed the newer session with %d", c)
	}
	kick("phone", kickMsg{Reason: KickReplaced, Session: "newer", Node: "n9", Rev: sp.rev.Load() + 1})
	waitFor(t, "phone replaced", func() bool { c, _ := phone.closed(); return c == CloseReplaced })
}

func TestPurgeAfterAllDevicesAck(t *testing.T) {
	e := newEnv(t, Config{CursorFlush: 10 * time.Millisecond}, func(s *Service) { s.purgeEvery = 10 * time.Millisecond })
	other := e.publishN(t, "carol", "c", 2)
	a, b := &testSink{}, &testSink{}
	sa := e.open(t, "bob", "phone", a)
	sb := e.open(t, "bob", "laptop", b)
	ids := e.publishN(t, "bob", "m", 5)
	waitIDs(t, a, ids)
	waitIDs(t, b, ids)

	sa.Ack(ids...)
	waitFor(t, "phone cursor", func() bool { return e.cursorOf(t, "bob").Devices["phone"].Floor > 0 })
	if n := e.stored(t, "bob"); n != 5 {
		t.Fatalf("stored %d after one device acked, want 5 (laptop has not acked)", n)
	}
	sb.Ack(ids[:2]...)
	waitFor(t, "partial purge", func() bool { return e.stored(t, "bob") == 3 })
	sb.Ack(ids[2:]...)
	waitFor(t, "full purge", func() bool { return e.stored(t, "bob") == 0 })
	if n := e.stored(t, "carol"); n != uint64(len(other)) {
		t.Fatalf("another user's inbox changed: %d", n)
	}
	if d := e.cursorOf(t, "bob"); d.Purged == 0 {
		t.Fatalf("purge point not recorded: %+v", d)
	}
}

// A device that acks a lot purges before purgeEvery has passed: acked mail
// still counts against the inbox cap until it is purged, so a busy reader
// would otherwise see "inbox full" for mail it has read.
func TestPurgeAfterManyAcks(t *testing.T) {
	e := newEnv(t, Config{CursorFlush: 10 * time.Millisecond}, func(s *Service) {
		s.purgeEvery = time.Hour
		s.purgeAcks = 20
	})
	a := &testSink{}
	sa := e.open(t, "bob", "phone", a)
	few := e.publishN(t, "bob", "f", 5)
	waitIDs(t, a, few)
	sa.Ack(few...)
	waitFor(t, "cursor", func() bool { return e.cursorOf(t, "bob").Devices["phone"].Floor > 0 })
	time.Sleep(50 * time.Millisecond) // several flushes: too few acks to purge
	if n := e.stored(t, "bob"); n != 5 {
		t.Fatalf("stored %d after 5 acks, want 5 (purge not due)", n)
	}
	many := e.publishN(t, "bob", "m", 30)
	waitIDs(t, a, append(few, many...))
	sa.Ack(many...)
	waitFor(t, "purge after many acks", func() bool { return e.stored(t, "bob") == 0 })
}

// A device that has not connected or acked for DeviceIdle no longer holds
// back purges: an abandoned phone does not fill the inbox of the devices in
// use. It comes back to what is still stored.
func TestIdleDeviceDoesNotHoldPurges(t *testing.T) {
	e := newEnv(t, Config{CursorFlush: 10 * time.Millisecond, DeviceIdle: 300 * time.Millisecond},
		func(s *Service) { s.purgeEvery = 10 * time.Millisecond })
	old := &testSink{}
	so := e.open(t, "bob", "old-phone", old)
	so.Close() // registered, never acks, never returns
	phone := &testSink{}
	sp := e.open(t, "bob", "phone", phone)
	first := e.publishN(t, "bob", "a", 3)
	waitIDs(t, phone, first)
	sp.Ack(first...)
	waitFor(t, "phone cursor", func() bool { return e.cursorOf(t, "bob").Devices["phone"].Floor > 0 })
	time.Sleep(50 * time.Millisecond)
	if n := e.stored(t, "bob"); n != 3 {
		t.Fatalf("stored %d while the old phone is recent, want 3", n)
	}
	time.Sleep(300 * time.Millisecond) // the old phone goes idle
	more := e.publishN(t, "bob", "b", 2)
	waitIDs(t, phone, append(first, more...))
	sp.Ack(more...)
	waitFor(t, "purge past the idle device", func() bool { return e.stored(t, "bob") == 0 })

	// The old phone returns: nothing of what was purged, the next message.
	sp.Close()
	back := &testSink{}
	e.open(t, "bob", "old-phone", back)
	next := e.publishN(t, "bob", "c", 1)
	waitIDs(t, back, next)
}

// Purges are bounded per node: with every slot taken a session's purge is
// skipped (and tried again later), not queued.
func TestPurgeSkippedWhenNodeBusy(t *testing.T) {
	e := newEnv(t, Config{CursorFlush: 10 * time.Millisecond}, func(s *Service) { s.purgeEvery = 10 * time.Millisecond })
	for range cap(e.svc.purgeSlots) {
		e.svc.purgeSlots <- struct{}{}
	}
	phone := &testSink{}
	sp := e.open(t, "bob", "phone", phone)
	ids := e.publishN(t, "bob", "m", 3)
	waitIDs(t, phone, ids)
	sp.Ack(ids...)
	waitFor(t, "phone cursor", func() bool { return e.cursorOf(t, "bob").Devices["phone"].Floor > 0 })
	time.Sleep(100 * time.Millisecond) // many flushes and purge attempts
	if n := e.stored(t, "bob"); n != 3 {
		t.Fatalf("stored %d while every purge slot is taken, want 3", n)
	}
	for range cap(e.svc.purgeSlots) {
		<-e.svc.purgeSlots
	}
	waitFor(t, "the skipped purge, retried", func() bool { return e.stored(t, "bob") == 0 })
}

// Session purges are rate-limited per node, except urgent ones (a device
// that acked purgeAcks messages since its last purge: its inbox fills).
func TestPurgeRateLimitSparesUrgentPurges(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	a, err := e.svc.getAssets()
	if err != nil {
		t.Fatal(err)
	}
	e.svc.purgeRate.SetLimit(0.001) // one token, then none for a long time
	doc := &cursorDoc{}
	if ran, err := e.svc.tryPurge(t.Context(), a, "bob", doc, false); err != nil || !ran {
		t.Fatalf("first purge: ran %v, err %v", ran, err)
	}
	if ran, _ := e.svc.tryPurge(t.Context(), a, "bob", doc, false); ran {
		t.Fatal("a second routine purge ran although the rate allows none")
	}
	if ran, err := e.svc.tryPurge(t.Context(), a, "bob", doc, true); err != nil || !ran {
		t.Fatalf("urgent purge: ran %v, err %v", ran, err)
	}
}

func TestMinFloorSkipsIdleDevices(t *testing.T) {
	d := &cursorDoc{Devices: map[string]*deviceCursor{
		"active": {laneCursor: laneCursor{Floor: 9}, Seen: 2000},
		"idle":   {laneCursor: laneCursor{Floor: 2}, Seen: 500},
		"legacy": {laneCursor: laneCursor{Floor: 5}}, // written before Seen existed: never idle
	}}
	if f, ok := d.minFloor(0); !ok || f != 2 {
		t.Errorf("no idle cut-off: %d %v, want 2", f, ok)
	}
	if f, ok := d.minFloor(1000); !ok || f != 5 {
		t.Errorf("idle before 1000: %d %v, want 5", f, ok)
	}
	delete(d.Devices, "legacy")
	if f, ok := d.minFloor(1000); !ok || f != 9 {
		t.Errorf("without legacy: %d %v, want 9", f, ok)
	}
	if _, ok := d.minFloor(3000); ok {
		t.Error("every device idle: want no floor")
	}
}

func TestCursorSurvivesRestart(t *testing.T) {
	leakCheck(t)
	dir := t.TempDir()
	srv := natstest.StartAt(t, dir)
	e := startService(t, srv, Config{}, nil)
	ids := e.publishN(t, "bob", "m", 5)
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, ids)
	ss.Ack("m1", "m2", "m4")
	ss.Close()
	e.stop()
	e.nc.Close()
	srv.Shutdown()
	srv.WaitForShutdown()

	e2 := startService(t, natstest.StartAt(t, dir), Config{}, nil)
	k2 := &testSink{}
	e2.open(t, "bob", "phone", k2)
	e2.publish(t, "bob", "m6")
	waitIDs(t, k2, []string{"m3", "m5", "m6"})
}

func TestOnline(t *testing.T) {
	fast := func(s *Service) { s.nodeTTL = time.Second; s.heartbeat = 100 * time.Millisecond }
	e1 := newEnv(t, Config{Node: "n1"}, fast)
	e2 := startService(t, e1.srv, Config{Node: "n2"}, fast)
	online := func() []schema.DeviceID {
		d, err := e1.svc.Online(t.Context(), "bob")
		if err != nil {
			t.Fatalf("online: %v", err)
		}
		return d
	}
	if d := online(); len(d) != 0 {
		t.Fatalf("online before any session: %v", d)
	}
	sp := e1.open(t, "bob", "phone", &testSink{})
	e2.open(t, "bob", "tablet", &testSink{})
	tab := e1.open(t, "bob", "laptop", &testSink{})
	if d := online(); !slices.Equal(d, []schema.DeviceID{"laptop", "phone", "tablet"}) {
		t.Fatalf("online = %v", d)
	}
	tab.Close()
	if d := online(); !slices.Equal(d, []schema.DeviceID{"phone", "tablet"}) {
		t.Fatalf("online after close = %v", d)
	}
	// Node n2 dies without deregistering: its connection is gone, its
	// heartbeat expires and its device drops out.
	e2.nc.Close()
	waitFor(t, "dead node's device offline", func() bool {
		return slices.Equal(online(), []schema.DeviceID{"phone"})
	})
	sp.Close()
	if d := online(); len(d) != 0 {
		t.Fatalf("online after all closed = %v", d)
	}
}

func TestEphemeral(t *testing.T) {
	e := newEnv(t, Config{AckTimeout: 100 * time.Millisecond}, nil)
	a, b := &testSink{}, &testSink{}
	sa := e.open(t, "bob", "phone", a)
	e.open(t, "bob", "laptop", b)
	m := testMsg("bob", "typing")
	m.Ephemeral = true
	if err := e.svc.PublishEphemeral(t.Context(), "bob", m); err != nil {
		t.Fatal(err)
	}
	waitIDs(t, a, []string{"typing"})
	waitIDs(t, b, []string{"typing"})
	if n := e.stored(t, "bob"); n != 0 {
		t.Fatalf("ephemeral message stored: %d", n)
	}
	// Not redelivered after the ack timeout (the stored m1, left unacked,
	// shows the timeout has passed), nor on reconnect.
	e.publish(t, "bob", "m1")
	waitIDs(t, a, []string{"typing", "m1"})
	waitFor(t, "m1 redelivered", func() bool { return a.count("m1") >= 2 })
	sa.Ack("m1")
	sa.Close()
	if got := a.count("typing"); got != 1 {
		t.Fatalf("ephemeral delivered %d times", got)
	}
	a2 := &testSink{}
	e.open(t, "bob", "phone", a2)
	e.publish(t, "bob", "m2")
	waitIDs(t, a2, []string{"m2"})

	if err := e.svc.PublishEphemeral(t.Context(), "bad.user", m); !errors.Is(err, schema.ErrInvalidID) {
		t.Fatalf("invalid user: %v", err)
	}
}

func TestAckByID(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	ids := e.publishN(t, "bob", "m", 4)
	// A device that never had a socket acks over REST.
	if err := e.svc.AckByID(t.Context(), "bob", "rest", []string{"m1", "m3", "nope"}); err != nil {
		t.Fatalf("ack by id: %v", err)
	}
	c := e.cursorOf(t, "bob").Devices["rest"]
	if c == nil || len(c.Acked) != 1 {
		t.Fatalf("cursor after REST ack: %+v", c)
	}
	k := &testSink{}
	ss := e.open(t, "bob", "rest", k)
	waitIDs(t, k, []string{"m2", "m4"})
	// A REST ack while a session is open reaches the session too.
	if err := e.svc.AckByID(t.Context(), "bob", "rest", []string{"m2", "m4"}); err != nil {
		t.Fatal(err)
	}
	ss.Close()
	k2 := &testSink{}
	e.open(t, "bob", "rest", k2)
	e.publish(t, "bob", "m5")
	waitIDs(t, k2, []string{"m5"})
	if n := e.stored(t, "bob"); n > 1 {
		t.Fatalf("acked messages not purged: %d stored of %d", n, len(ids)+1)
	}
}

func TestOpenErrors(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.JetStream(t)
	s, err := New(Config{JS: js})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Open(t.Context(), "bob", "phone", &testSink{}); !errors.Is(err, ErrNotSetup) {
		t.Fatalf("open before setup: %v", err)
	}
	if err := s.Setup(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Open(t.Context(), "bob", "phone", &testSink{}); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("open before run: %v", err)
	}
	if _, err := s.Open(t.Context(), "bob>", "phone", &testSink{}); !errors.Is(err, schema.ErrInvalidID) {
		t.Fatalf("open with bad user: %v", err)
	}
}

func TestRunClosesSessionsOnShutdown(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	e.publish(t, "bob", "m1")
	waitIDs(t, k, []string{"m1"})
	ss.Ack("m1")
	e.stop()
	if c, n := k.closed(); c != CloseGoingAway || n != 1 {
		t.Fatalf("close = %d (%d times), want %d once", c, n, CloseGoingAway)
	}
	ss.Close() // idempotent after the service ended
	if e.svc.Sessions() != 0 {
		t.Fatal("sessions left after Run returned")
	}
	if _, err := e.svc.Open(t.Context(), "bob", "phone", &testSink{}); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("open after run: %v", err)
	}
	// The ack was flushed on the way out.
	if c := e.cursorOf(t, "bob").Devices["phone"]; c == nil || c.Floor == 0 {
		t.Fatalf("cursor not flushed on shutdown: %+v", c)
	}
	a, _ := e.svc.getAssets()
	if _, err := a.nodes.Get(context.Background(), e.svc.Node()); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("node heartbeat left behind: %v", err)
	}
}
