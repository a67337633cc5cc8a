package delivery

import (
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

// ackSink acks every message as soon as it is delivered, like a fast client.
type ackSink struct {
	mu      sync.Mutex
	ss      *Session
	pending []string // delivered before the session was known
	n       atomic.Int64
	want    int64
	done    chan struct{}
	// Optionally, a count shared by several sinks: allDone is closed when
	// it reaches totalWant.
	total     *atomic.Int64
	totalWant int64
	allDone   chan struct{}
}

func (k *ackSink) Deliver(m *schema.Message) bool {
	k.mu.Lock()
	if k.ss != nil {
		k.ss.Ack(m.ID)
	} else {
		k.pending = append(k.pending, m.ID)
	}
	k.mu.Unlock()
	if k.n.Add(1) == k.want {
		close(k.done)
	}
	if k.total != nil && k.total.Add(1) == k.totalWant {
		close(k.allDone)
	}
	return true
}

func (k *ackSink) Close(int, string) {}

func (k *ackSink) attach(ss *Session) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.ss = ss
	ss.Ack(k.pending...)
	k.pending = nil
}

// BenchmarkSessionDeliver measures messages per second through one session:
// the backlog is stored first, then one device reads it (batched Direct Get,
// decode, deliver) and acks every message as it arrives (window refills,
// cursor flushes, purges).
func BenchmarkSessionDeliver(b *testing.B) {
	e := startService(b, natstest.Start(b), Config{MaxPerUser: 1 << 20}, nil)
	e.publishN(b, "bob", "m", b.N)
	k := &ackSink{done: make(chan struct{}), want: int64(b.N)}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	ss, err := e.svc.Open(b.Context(), "bob", "phone", k)
	if err != nil {
		b.Fatal(err)
	}
	k.attach(ss)
	select {
	case <-k.done:
	case <-time.After(5 * time.Minute):
		b.Fatalf("delivered %d of %d", k.n.Load(), b.N)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
	ss.Close()
}

// BenchmarkGroupFanout measures the live fan-out of group messages to the
// sessions of a group's members on one node: each message stored once in
// GROUP_LOG reaches every member's sink, which acks it at once. ns/op is
// per message; deliveries/s counts member copies.
func BenchmarkGroupFanout(b *testing.B) {
	const members = 200
	mt := &memberTable{}
	e := startService(b, natstest.Start(b), Config{Groups: mt}, nil)
	var delivered atomic.Int64
	want := int64(b.N) * (members - 1) // the sender gets none
	done := make(chan struct{})
	sinks := make([]*ackSink, members)
	for i := range members {
		u := schema.UserID("m" + strconv.Itoa(i))
		mt.set(u, "team", schema.Epoch{})
		k := &ackSink{done: make(chan struct{}), want: -1, total: &delivered, totalWant: want, allDone: done}
		sinks[i] = k
		ss, err := e.svc.Open(b.Context(), u, "phone", k)
		if err != nil {
			b.Fatal(err)
		}
		k.attach(ss)
	}
	waitFor(b, "every member subscribed", func() bool {
		e.svc.mu.RLock()
		defer e.svc.mu.RUnlock()
		u := e.svc.groups["team"]
		return u != nil && len(u.sessions) == members
	})
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		e.publishGroup(b, "team", "m0", "g"+strconv.Itoa(i))
	}
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatalf("delivered %d of %d", delivered.Load(), want)
	}
	b.StopTimer()
	b.ReportMetric(float64(want)/time.Since(start).Seconds(), "deliveries/s")
}
