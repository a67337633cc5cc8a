package delivery

import (
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vartalap/vartalap/schema"
)

func recentLive(seq, last uint64, size int) *nats.Msg {
	return &nats.Msg{
		Header: nats.Header{
			schema.HeaderSequence: []string{strconv.FormatUint(seq, 10)},
			schema.HeaderLastSeq:  []string{strconv.FormatUint(last, 10)},
		},
		Data: make([]byte, size),
	}
}

func seqsOf(b []recentMsg) []uint64 {
	var s []uint64
	for _, e := range b {
		s = append(s, e.seq)
	}
	return s
}

// recent gives the messages after a position only as far as it holds them
// without a hole in the subject, and stays within its bounds.
func TestRecent(t *testing.T) {
	dec := &schema.Message{}
	var r recent
	// The subject's messages are 10, 12, 15, 20, 21; 30 follows 25,
	// which the ring never got (a dropped live message).
	for _, p := range [][2]uint64{{10, 7}, {12, 10}, {15, 12}, {20, 15}, {21, 20}, {30, 25}} {
		m := recentLive(p[0], p[1], 10)
		r.add(m, dec, readLiveSeq(m.Header))
	}
	old := recentLive(21, 20, 10)
	r.add(old, dec, readLiveSeq(old.Header)) // not after the newest: ignored
	eph := &nats.Msg{Data: []byte("ephemeral")}
	r.add(eph, dec, readLiveSeq(eph.Header)) // no sequence: ignored
	cases := []struct {
		from   uint64
		max    int
		want   []uint64
		newest bool
	}{
		{7, 10, []uint64{10, 12, 15, 20, 21}, false}, // up to the hole before 30
		{9, 10, []uint64{10, 12, 15, 20, 21}, false}, // 10's previous (7) is before 9
		{5, 10, nil, false},                          // 7 may be missing: not here
		{12, 2, []uint64{15, 20}, false},
		{21, 10, nil, false}, // 30's previous, 25, is not here
		{25, 10, []uint64{30}, true},
		{30, 10, nil, false},
	}
	for _, tc := range cases {
		got, newest := r.after(tc.from, tc.max, nil)
		if !slices.Equal(seqsOf(got), tc.want) || newest != tc.newest {
			t.Errorf("after(%d, %d) = %v newest %v, want %v newest %v", tc.from, tc.max, seqsOf(got), newest, tc.want, tc.newest)
		}
	}
	// Bounded by count and by bytes: the oldest go.
	var c recent
	for i := range uint64(recentMsgs + 5) {
		cm := recentLive(i+1, i, 1)
		c.add(cm, dec, readLiveSeq(cm.Header))
	}
	if c.n != recentMsgs || c.at(0).seq != 6 {
		t.Fatalf("%d messages from %d, want %d from 6", c.n, c.at(0).seq, recentMsgs)
	}
	var b recent
	for i := range uint64(10) {
		bm := recentLive(i+1, i, recentBytes/4)
		b.add(bm, dec, readLiveSeq(bm.Header))
	}
	if b.bytes > recentBytes || b.n != 4 || b.at(0).seq != 7 {
		t.Fatalf("%d bytes in %d messages from %d", b.bytes, b.n, b.at(0).seq)
	}
}

// A member whose live queue overflowed catches up from the group's latest
// messages in memory, in order, without reading GROUP_LOG for them.
func TestGroupCatchUpFromRecent(t *testing.T) {
	mt := &memberTable{}
	e := newEnv(t, Config{Groups: mt}, func(s *Service) {
		s.queueMsgs = 2
		s.dropSweep = time.Hour
		s.recentMembers = 2
	})
	for _, u := range []schema.UserID{"u1", "u2", "u3"} {
		mt.set(u, "team", schema.Epoch{})
	}
	gate := make(chan struct{})
	release := func() { close(gate) }
	stalled := &testSink{gate: gate}
	k1, k3 := &testSink{}, &testSink{}
	// u2's worker delivers m1 from its inbox first and stalls there.
	e.publish(t, "u2", "m1")
	e.open(t, "u1", "phone", k1)
	e.open(t, "u2", "phone", stalled)
	e.open(t, "u3", "phone", k3)
	waitFor(t, "group kept in memory", func() bool {
		e.svc.mu.RLock()
		defer e.svc.mu.RUnlock()
		u := e.svc.groups["team"]
		return u != nil && len(u.sessions) == 3 && u.recent != nil
	})
	var ids []string
	for i := range 6 {
		id := "x" + strconv.Itoa(i+1)
		e.publishGroup(t, "team", "u1", id)
		ids = append(ids, id)
	}
	waitIDs(t, k3, ids)
	release()
	waitIDs(t, stalled, append([]string{"m1"}, ids...))
	if n := testutil.ToFloat64(e.svc.metrics.fellBehind); n < 1 {
		t.Fatal("u2 did not fall behind: the test did not test anything")
	}
	if n := testutil.ToFloat64(e.svc.metrics.fromRecent); n < 1 {
		t.Fatalf("u2 caught up without the group's latest messages in memory (%v from there)", n)
	}
	waitFor(t, "caught up", func() bool { return e.svc.lagging.Load() == 0 })
	// Live delivery goes on after the catch-up.
	e.publishGroup(t, "team", "u1", "x7")
	waitIDs(t, stalled, append(append([]string{"m1"}, ids...), "x7"))
}

// A group message that waited in a member's queue longer than
// LiveAgeHigh (the member's worker was busy) makes the node count as
// overloaded; one handed out at once does not.
func TestOverloadedByQueuedGroupMessages(t *testing.T) {
	mt := &memberTable{}
	e := newEnv(t, Config{Groups: mt}, func(s *Service) { s.lateFor = time.Minute })
	mt.set("u2", "team", schema.Epoch{})
	k := &testSink{}
	ss := e.open(t, "u2", "phone", k)
	waitFor(t, "subscribed", func() bool {
		e.svc.mu.RLock()
		defer e.svc.mu.RUnlock()
		return e.svc.groups["team"] != nil
	})
	live := func(seq uint64, id string) *nats.Msg {
		m := recentLive(seq, 0, 0)
		m.Subject = schema.DeliverGroup("team")
		m.Header.Set(schema.HeaderSender, "u1")
		m.Data = groupMsg("team", "u1", id).MarshalProto()
		return m
	}
	dec := func(m *nats.Msg) *schema.Message {
		d, err := schema.UnmarshalProto(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	// As the dispatcher hands them over (queued for the worker), the
	// first just now, the second a second ago.
	m1 := live(100, "x1")
	ss.push(m1, dec(m1), readLiveSeq(m1.Header), time.Now(), false)
	waitIDs(t, k, []string{"x1"})
	if e.svc.Overloaded() {
		t.Fatal("overloaded by a message handed out at once")
	}
	m2 := live(101, "x2")
	m2.Header.Set(schema.HeaderLastSeq, "100")
	ss.push(m2, dec(m2), readLiveSeq(m2.Header), time.Now().Add(-time.Second), false)
	waitIDs(t, k, []string{"x1", "x2"})
	if !e.svc.Overloaded() {
		t.Fatal("not overloaded after a group message waited a second in the queue")
	}
}
