package delivery

import (
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/testlog"
	"github.com/vartalap/vartalap/schema"
)

// TestScan reads a user's inbox across batches, from any position, stopping
// early, without another user's messages.
func TestScan(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	var seqs []uint64
	for i := range 7 {
		seqs = append(seqs, e.publish(t, "bob", "b"+string(rune('1'+i))))
		e.publish(t, "carol", "c"+string(rune('1'+i))) // interleaved, never read
	}
	cases := []struct {
		name    string
		from    uint64
		batch   int
		stopAt  int // fn returns false after this many; 0 = never
		want    []uint64
		wantEnd bool
	}{
		{"all in one batch", 1, 256, 0, seqs, true},
		{"several batches", 1, 3, 0, seqs, true},
		{"batch of one", 1, 1, 0, seqs, true},
		{"from the middle", seqs[3], 2, 0, seqs[3:], true},
		{"from between two", seqs[3] + 1, 2, 0, seqs[4:], true},
		{"past the end", seqs[6] + 1, 3, 0, nil, true},
		{"stopped early", 1, 3, 4, seqs[:4], false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var got []uint64
			end, err := e.svc.scan(t.Context(), schema.StreamInbox, schema.UserInbox("bob"), tc.from, tc.batch, func(m *jetstream.RawStreamMsg) bool {
				got = append(got, m.Sequence)
				if msg, err := schema.UnmarshalProto(m.Data); err != nil || msg.Destination != "bob" {
					t.Errorf("seq %d: %v, destination %q", m.Sequence, err, msg.Destination)
				}
				return tc.stopAt == 0 || len(got) < tc.stopAt
			})
			if err != nil {
				t.Fatalf("scan: %v", err)
			}
			if !slices.Equal(got, tc.want) || end != tc.wantEnd {
				t.Fatalf("got %v end=%v, want %v end=%v", got, end, tc.want, tc.wantEnd)
			}
		})
	}
}

// isWorking reports whether the session's worker goroutine runs.
func (ss *Session) isWorking() bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.working
}

// An idle session has no goroutine; live messages, acks and the timers
// (redelivery, cursor flush) start one, and it exits again.
func TestIdleSessionHasNoWorker(t *testing.T) {
	e := newEnv(t, Config{AckTimeout: 100 * time.Millisecond, CursorFlush: 20 * time.Millisecond}, nil)
	e.publish(t, "bob", "old")
	k := &testSink{}
	ss := e.open(t, "bob", "phone", k)
	waitIDs(t, k, []string{"old"})
	// Nothing acked: the redelivery timer wakes a worker while none runs.
	waitFor(t, "redelivery by timer", func() bool { return k.count("old") >= 2 })
	ss.Ack("old")
	seq := e.publish(t, "bob", "live")
	waitFor(t, "live message", func() bool { return k.count("live") == 1 })
	ss.Ack("live")
	// The flush timer writes the cursor with no worker waiting for it.
	waitFor(t, "cursor flushed", func() bool {
		c := e.cursorOf(t, "bob").Devices["phone"]
		return c != nil && c.Floor >= seq
	})
	waitFor(t, "worker gone", func() bool { return !ss.isWorking() })
	// It keeps at most keepIdle entries of each buffer, and no acked set.
	ss.mu.Lock()
	held := max(cap(ss.inq), cap(ss.acks), cap(ss.inbox.flight), cap(ss.spareQ), cap(ss.spareAcks))
	acked := ss.inbox.acked != nil
	ss.mu.Unlock()
	if held > keepIdle || acked {
		t.Fatalf("idle session holds buffers of %d entries (acked set: %v)", held, acked)
	}
	ss.Close()
}

// The timer is set only for work the next step would do: a deadline that
// has passed for work step skips (a cursor write or purge while the last
// write still runs, a read retry while the window is full) would fire it
// again at once, step after step: a thousand sessions of a group that fell
// behind spun the server's two cores that way until their writes finished.
func TestArmSkipsWorkStepWouldNotDo(t *testing.T) {
	e := newEnv(t, Config{CursorFlush: 50 * time.Millisecond, MaxInFlight: 4}, nil)
	now := time.Now()
	past := now.Add(-time.Second)
	later := now.Add(time.Minute)
	cases := []struct {
		name string
		set  func(ss *Session)
		want time.Time // zero: no timer
	}{
		{"cursor write while the last one runs", func(ss *Session) {
			ss.dirty, ss.flushing, ss.lastFlush = true, true, monoOf(past)
		}, time.Time{}},
		{"cursor write due", func(ss *Session) {
			ss.dirty, ss.lastFlush = true, monoOf(past)
		}, past.Add(50 * time.Millisecond)},
		{"purge while a cursor write runs", func(ss *Session) {
			ss.purgeDue, ss.flushing, ss.lastPurge = true, true, past
		}, time.Time{}},
		{"purge due", func(ss *Session) {
			ss.purgeDue, ss.lastPurge = true, past
		}, past.Add(e.svc.purgeEvery)},
		{"read retry with the window full", func(ss *Session) {
			ss.inbox.behind, ss.inbox.retryAt = true, past
			ss.inFlight, ss.dueAt = 4, monoOf(later)
		}, later},
		{"read retry with the window more than half full", func(ss *Session) {
			ss.inbox.behind, ss.inbox.retryAt = true, past
			ss.inFlight, ss.dueAt = 3, monoOf(later)
		}, later},
		{"read retry with room", func(ss *Session) {
			ss.inbox.behind, ss.inbox.retryAt = true, past
			ss.inFlight, ss.dueAt = 1, monoOf(later)
		}, past},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// Not started (Open was not called): a timer that fires
			// starts no worker.
			ss := newSession(e.svc, "bob", "phone", &testSink{})
			ss.lastFlush = monoNow()
			tc.set(ss)
			ss.arm(now)
			if ss.timer != nil {
				defer ss.timer.Stop()
			}
			if got := ss.armedAt.time(); !got.Equal(tc.want) {
				t.Fatalf("timer armed for %v, want %v (now %v)", got, tc.want, now)
			}
		})
	}
}

// A node counts as overloaded while its sessions hand out live group
// messages that waited over LiveAgeHigh in their queues, and for lateFor
// after the last one.
func TestOverloadedByWait(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	now := time.Now()
	e.svc.noteWait(50*time.Millisecond, now)
	if e.svc.Overloaded() {
		t.Fatal("overloaded by messages that hardly waited")
	}
	e.svc.noteWait(LiveAgeHigh+time.Second, now.Add(-time.Second))
	if e.svc.Overloaded() {
		t.Fatal("overloaded by a late message handed out over lateFor ago")
	}
	e.svc.noteWait(LiveAgeHigh+100*time.Millisecond, now)
	if !e.svc.Overloaded() {
		t.Fatal("not overloaded right after a late message")
	}
	waitFor(t, "overload to pass", func() bool { return !e.svc.Overloaded() })
}

// Sessions' warnings are rate-limited: a thousand sessions failing the same
// way at once log a burst, then sessionWarnsPerSecond, and the next line
// logged says how many were left out.
func TestSessionWarningsLimited(t *testing.T) {
	var buf testlog.Buffer
	e := newEnv(t, Config{Logger: slog.New(slog.NewTextHandler(&buf, nil))}, nil)
	for range 100 {
		e.svc.warn("cursor flush", "user", "u1")
	}
	if n := strings.Count(buf.String(), `msg="cursor flush"`); n != sessionWarnsBurst {
		t.Fatalf("%d warnings logged of 100 at once, want the burst of %d", n, sessionWarnsBurst)
	}
	waitFor(t, "a warning to be allowed again", func() bool { return e.svc.warnRate.Tokens() >= 1 })
	e.svc.warn("cursor flush", "user", "u1")
	if !strings.Contains(buf.String(), "suppressed=80") {
		t.Fatalf("the next warning does not count the 80 left out:\n%s", buf.String())
	}
}
