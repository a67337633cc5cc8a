package push

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vartalap/vartalap/internal/testlog"
	"github.com/vartalap/vartalap/schema"
)

func TestNewValidates(t *testing.T) {
	e := newEnv(t)
	base := Config{JS: e.js, Presence: e.pres, Devices: e.devs, Sender: e.snd}
	tests := []struct {
		name   string
		mutate func(*Config)
		ok     bool
	}{
		{"defaults", func(*Config) {}, true},
		{"no js", func(c *Config) { c.JS = nil }, false},
		{"no presence", func(c *Config) { c.Presence = nil }, false},
		{"no devices", func(c *Config) { c.Devices = nil }, false},
		{"no sender", func(c *Config) { c.Sender = nil }, false},
		{"ttl below a second", func(c *Config) { c.TTL = time.Millisecond }, false},
		{"ttl above 28 days", func(c *Config) { c.TTL = 29 * 24 * time.Hour }, false},
		{"negative concurrency", func(c *Config) { c.Concurrency = -1 }, false},
		{"negative coalesce", func(c *Config) { c.Coalesce = -time.Second }, false},
		{"negative attempts", func(c *Config) { c.MaxAttempts = -1 }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			tt.mutate(&cfg)
			s, err := New(cfg)
			if tt.ok != (err == nil) {
				t.Fatalf("New: err=%v, want ok=%v", err, tt.ok)
			}
			if err == nil && (s.ttl != DefaultTTL || s.workers != DefaultConcurrency || s.window != DefaultCoalesce || s.maxAttempts != DefaultMaxAttempts) {
				t.Fatalf("defaults not filled: ttl=%v workers=%d window=%v attempts=%d", s.ttl, s.workers, s.window, s.maxAttempts)
			}
		})
	}
}

// TestWhoGetsPushed covers presence, tokens and the message kinds that are
// never pushed.
func TestWhoGetsPushed(t *testing.T) {
	e := newEnv(t)
	e.cfg.TTL = DefaultTTL
	e.run(t, e.service(t))

	notification := func(to schema.UserID) *schema.Message {
		m := chat("alice", to, "x")
		m.Type = schema.TypeNotification
		m.Meta[schema.MetaAction] = "read"
		return m
	}
	tests := []struct {
		name   string
		online []schema.DeviceID
		devs   []Device
		msg    func(to schema.UserID) *schema.Message
		want   []string // tokens pushed
	}{
		{"both devices offline", nil, []Device{{"d1", "t1"}, {"d2", "t2"}}, func(to schema.UserID) *schema.Message { return chat("alice", to, "hi") }, []string{"t1", "t2"}},
		{"one device online", []schema.DeviceID{"d1"}, []Device{{"d1", "t1"}, {"d2", "t2"}}, func(to schema.UserID) *schema.Message { return chat("alice", to, "hi") }, []string{"t2"}},
		{"both devices online", []schema.DeviceID{"d1", "d2"}, []Device{{"d1", "t1"}, {"d2", "t2"}}, func(to schema.UserID) *schema.Message { return chat("alice", to, "hi") }, nil},
		{"device without token", nil, []Device{{"d1", ""}, {"d2", "t2"}}, func(to schema.UserID) *schema.Message { return chat("alice", to, "hi") }, []string{"t2"}},
		{"no devices", nil, nil, func(to schema.UserID) *schema.Message { return chat("alice", to, "hi") }, nil},
		{"custom type", nil, []Device{{"d1", "t1"}}, func(to schema.UserID) *schema.Message {
			m := chat("alice", to, "hi")
			m.Type = schema.TypeCustom
			return m
		}, []string{"t1"}},
		{"ephemeral", nil, []Device{{"d1", "t1"}, {"d2", "t2"}}, func(to schema.UserID) *schema.Message {
			m := chat("alice", to, "typing")
			m.Ephemeral = true
			return m
		}, nil},
		{"notification", nil, []Device{{"d1", "t1"}, {"d2", "t2"}}, notification, nil},
		{"client ack", nil, []Device{{"d1", "t1"}}, func(to schema.UserID) *schema.Message {
			m := chat("alice", to, "")
			m.Type = schema.TypeClientAck
			return m
		}, nil},
		{"server ack", nil, []Device{{"d1", "t1"}}, func(to schema.UserID) *schema.Message {
			m := chat("alice", to, "")
			m.Type = schema.TypeServerAck
			m.Source = schema.ServerSource
			return m
		}, nil},
		{"copy of own message for other devices", nil, []Device{{"d1", "t1"}}, func(to schema.UserID) *schema.Message { return chat(to, "alice", "mine") }, nil},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			user := schema.UserID(fmt.Sprintf("user%d", i))
			for j := range tt.devs {
				if tt.devs[j].Token != "" {
					tt.devs[j].Token = fmt.Sprintf("%s-%s", user, tt.devs[j].Token)
				}
			}
			e.devs.set(user, tt.devs...)
			e.pres.set(user, tt.online...)
			m := tt.msg(user)
			e.waitAcked(t, e.publish(t, user, m))

			var got []string
			for _, n := range e.snd.sent() {
				if strings.HasPrefix(n.Token, string(user)+"-") {
					got = append(got, strings.TrimPrefix(n.Token, string(user)+"-"))
					if n.Data[DataMessage] != rendered(t, m) {
						t.Errorf("data.message = %s, want %s", n.Data[DataMessage], rendered(t, m))
					}
					if _, ok := n.Data[DataCount]; ok || len(n.Data) != 1 {
						t.Errorf("data = %v, want only %q", n.Data, DataMessage)
					}
					if n.TTL != 24*time.Hour {
						t.Errorf("ttl = %v, want 24h", n.TTL)
					}
					if n.CollapseKey != "alice" {
						t.Errorf("collapse key = %q, want the sender", n.CollapseKey)
					}
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("pushed to %v, want %v", got, tt.want)
			}
		})
	}
}

func TestGroupCollapseKey(t *testing.T) {
	e := newEnv(t)
	e.run(t, e.service(t))
	e.devs.set("bob", Device{"d1", "tb"})
	m := chat("alice", "team1", "hello group")
	m.Channel = schema.ChannelGroup
	e.waitAcked(t, e.publish(t, "bob", m))
	sent := e.snd.sent()
	if len(sent) != 1 || sent[0].CollapseKey != "team1" || sent[0].Token != "tb" {
		t.Fatalf("sent %+v, want one push to tb with collapse key team1", sent)
	}
}

func TestCoalesceBurst(t *testing.T) {
	e := newEnv(t)
	e.cfg.Coalesce = 2 * time.Second
	// The service's log, printed if the test fails (it once timed out
	// waiting for the last ack in CI and could not be reproduced).
	var logs testlog.Buffer
	e.cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("push log:\n%s", logs.String())
		}
	})
	gate := make(chan struct{})
	e.devs.gate = gate
	e.devs.set("bob", Device{"d1", "t1"}, Device{"d2", "t2"})
	s := e.service(t)
	e.run(t, s)

	// Lookups wait at the gate until the whole burst is stored, so the
	// burst reaches the coalescer well inside one window.
	const burst = 50
	var last *schema.Message
	var seq uint64
	for i := range burst {
		last = chat("alice", "bob", fmt.Sprintf("msg %d", i))
		seq = e.publish(t, "bob", last)
	}
	e.devs.mu.Lock()
	close(gate)
	e.devs.gate = nil
	e.devs.mu.Unlock()
	e.waitAcked(t, seq)

	for _, tok := range []string{"t1", "t2"} {
		got := e.snd.sentTo(tok)
		if len(got) != 1 {
			t.Fatalf("%d pushes to %s, want 1", len(got), tok)
		}
		if got[0].Data[DataCount] != "50" {
			t.Errorf("count = %q, want 50", got[0].Data[DataCount])
		}
		if got[0].Data[DataMessage] != rendered(t, last) {
			t.Errorf("push carries %s, want the latest message %s", got[0].Data[DataMessage], rendered(t, last))
		}
	}
	if st := s.Stats(); st.Sent != 2 || st.Coalesced != 2*(burst-1) {
		t.Fatalf("stats %+v, want sent 2 coalesced %d", st, 2*(burst-1))
	}
}

// TestCoalesceWindows checks that a message after a window closed gets its
// own push, without count.
func TestCoalesceWindows(t *testing.T) {
	e := newEnv(t)
	e.run(t, e.service(t))
	e.devs.set("bob", Device{"d1", "t1"})
	for i := range 3 {
		m := chat("alice", "bob", fmt.Sprintf("msg %d", i))
		e.waitAcked(t, e.publish(t, "bob", m))
		got := e.snd.sentTo("t1")
		if len(got) != i+1 {
			t.Fatalf("after message %d: %d pushes, want %d", i, len(got), i+1)
		}
		if c, ok := got[i].Data[DataCount]; ok {
			t.Fatalf("single message push has count %q", c)
		}
	}
}

func TestTokenInvalid(t *testing.T) {
	tests := []struct {
		name        string
		removeErr   error
		wantRemoved uint64
	}{
		{"removal succeeds", nil, 1},
		{"removal fails", errBoom, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			e.devs.removeErr = tt.removeErr
			e.snd.fn = func(_ context.Context, n Notification, _ int) error {
				if n.Token == "bad" {
					return fmt.Errorf("fake provider: %w", ErrTokenInvalid)
				}
				return nil
			}
			s := e.service(t)
			e.run(t, s)
			e.devs.set("bob", Device{"d1", "bad"}, Device{"d2", "good"})

			e.waitAcked(t, e.publish(t, "bob", chat("alice", "bob", "one")))
			want := []removal{{"bob", "d1", "bad"}}
			if got := e.devs.removals(); !slices.Equal(got, want) {
				t.Fatalf("removals %v, want %v", got, want)
			}
			// Later messages never use the token again, even when the
			// removal failed and Devices still returns it.
			e.waitAcked(t, e.publish(t, "bob", chat("carol", "bob", "two")))
			if got := len(e.snd.callsTo("bad")); got != 1 {
				t.Fatalf("%d calls with the bad token, want 1", got)
			}
			if got := len(e.snd.sentTo("good")); got != 2 {
				t.Fatalf("%d pushes to the good token, want 2", got)
			}
			if st := s.Stats(); st.TokensRemoved != tt.wantRemoved || st.Sent != 2 || st.Failed != 0 {
				t.Fatalf("stats %+v, want tokens removed %d, sent 2, failed 0", st, tt.wantRemoved)
			}
		})
	}
}

func TestRetry(t *testing.T) {
	tests := []struct {
		name        string
		failures    int // calls that fail before success (-1: all fail)
		err         func() error
		maxAttempts int
		wantCalls   int
		wantStats   Stats
		minGap      time.Duration // lower bound between the first two calls
	}{
		{
			name: "retryable then success", failures: 2,
			err:       func() error { return &RetryableError{After: 20 * time.Millisecond, Err: errBoom} },
			wantCalls: 3, wantStats: Stats{Sent: 1, Retried: 2},
		},
		{
			name: "honours retry-after", failures: 1,
			err:       func() error { return &RetryableError{After: 400 * time.Millisecond, Err: errBoom} },
			wantCalls: 2, wantStats: Stats{Sent: 1, Retried: 1}, minGap: 400 * time.Millisecond,
		},
		{
			name: "backoff without retry-after", failures: 1,
			err:       func() error { return &RetryableError{Err: errBoom} },
			wantCalls: 2, wantStats: Stats{Sent: 1, Retried: 1}, minGap: firstRetryDelay,
		},
		{
			name: "gives up after max attempts", failures: -1, maxAttempts: 3,
			err:       func() error { return &RetryableError{After: 10 * time.Millisecond, Err: errBoom} },
			wantCalls: 3, wantStats: Stats{Failed: 1, Retried: 2},
		},
		{
			name: "retry-after too long gives up", failures: -1,
			err:       func() error { return &RetryableError{After: time.Hour, Err: errBoom} },
			wantCalls: 1, wantStats: Stats{Failed: 1},
		},
		{
			name: "permanent error is not retried", failures: -1,
			err:       func() error { return errBoom },
			wantCalls: 1, wantStats: Stats{Failed: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			e.cfg.MaxAttempts = tt.maxAttempts
			e.snd.fn = func(_ context.Context, _ Notification, attempt int) error {
				if tt.failures < 0 || attempt <= tt.failures {
					return tt.err()
				}
				return nil
			}
			s := e.service(t)
			e.run(t, s)
			e.devs.set("bob", Device{"d1", "t1"})
			e.waitAcked(t, e.publish(t, "bob", chat("alice", "bob", "hi")))

			calls := e.snd.all()
			if len(calls) != tt.wantCalls {
				t.Fatalf("%d calls, want %d", len(calls), tt.wantCalls)
			}
			if tt.minGap > 0 {
				if gap := calls[1].at.Sub(calls[0].at); gap < tt.minGap {
					t.Fatalf("retry after %v, want at least %v", gap, tt.minGap)
				}
			}
			if st := s.Stats(); st != tt.wantStats {
				t.Fatalf("stats %+v, want %+v", st, tt.wantStats)
			}
		})
	}
}

// TestBlockingSender: pushes stuck in the provider occupy at most
// Concurrency workers, other users' pushes go on, Run stops on cancel, and
// the stuck messages are pushed by the next run.
func TestBlockingSender(t *testing.T) {
	e := newEnv(t)
	e.cfg.Concurrency = 2
	var mu sync.Mutex
	canceled := 0
	e.snd.fn = func(ctx context.Context, n Notification, _ int) error {
		if !strings.HasPrefix(n.Token, "stuck") {
			return nil
		}
		<-ctx.Done()
		mu.Lock()
		canceled++
		mu.Unlock()
		return ctx.Err()
	}
	for _, u := range []schema.UserID{"a", "b", "c", "d"} {
		tok := "ok-" + string(u)
		if u == "a" || u == "c" {
			tok = "stuck-" + string(u)
		}
		e.devs.set(u, Device{"d1", tok})
	}
	stop := e.run(t, e.service(t))

	e.publish(t, "a", chat("alice", "a", "1"))
	waitFor(t, "the first stuck push", func() bool {
		e.snd.mu.Lock()
		defer e.snd.mu.Unlock()
		return e.snd.inFlight == 1
	})
	e.publish(t, "b", chat("alice", "b", "2"))
	waitFor(t, "push to b while a is stuck", func() bool { return len(e.snd.sentTo("ok-b")) == 1 })
	e.publish(t, "c", chat("alice", "c", "3"))
	e.publish(t, "d", chat("alice", "d", "4"))
	waitFor(t, "both workers stuck", func() bool {
		e.snd.mu.Lock()
		defer e.snd.mu.Unlock()
		return e.snd.inFlight == 2
	})
	if got := e.snd.maxInFlight(); got > 2 {
		t.Fatalf("%d sends in flight, want at most Concurrency=2", got)
	}

	stop()
	mu.Lock()
	if canceled != 2 {
		t.Errorf("%d stuck sends saw cancellation, want 2", canceled)
	}
	mu.Unlock()

	// The next run gets the held messages back and pushes them.
	e.snd.mu.Lock()
	e.snd.fn = nil
	e.snd.mu.Unlock()
	e.run(t, e.service(t))
	waitFor(t, "pushes of the held messages", func() bool {
		return len(e.snd.sentTo("stuck-a")) == 1 && len(e.snd.sentTo("stuck-c")) == 1 && len(e.snd.sentTo("ok-d")) == 1
	})
	e.waitAcked(t, 4)
	if got := len(e.snd.sentTo("ok-b")); got != 1 {
		t.Fatalf("b pushed %d times, want 1", got)
	}
}

// TestDurable: the consumer keeps its position across runs (messages stored
// while no push service runs are pushed later; acked ones are not pushed
// again), and a new deployment does not push the backlog.
func TestDurable(t *testing.T) {
	e := newEnv(t)
	e.devs.set("bob", Device{"d1", "t1"})
	backlog := e.publish(t, "bob", chat("alice", "bob", "before the push service existed"))

	stop := e.run(t, e.service(t))
	one := chat("alice", "bob", "one")
	first := e.publish(t, "bob", one)
	e.waitAcked(t, first)
	stop()
	if info := e.consumerInfo(t); info.AckFloor.Stream != first || info.NumAckPending != 0 || info.Delivered.Consumer != 1 {
		t.Fatalf("consumer after run 1: ack floor %d pending %d deliveries %d, want %d 0 1",
			info.AckFloor.Stream, info.NumAckPending, info.Delivered.Consumer, first)
	}
	offline := chat("alice", "bob", "stored while stopped")
	second := e.publish(t, "bob", offline)

	e.run(t, e.service(t))
	e.waitAcked(t, second)
	got := e.snd.sentTo("t1")
	if len(got) != 2 {
		t.Fatalf("%d pushes, want 2 (one per run, no backlog, no re-push)", len(got))
	}
	for i, want := range []*schema.Message{one, offline} {
		if got[i].Data[DataMessage] != rendered(t, want) || got[i].Data[DataCount] != "" {
			t.Errorf("push %d carries %v, want only %s", i, got[i].Data, rendered(t, want))
		}
	}
	if backlog >= first {
		t.Fatalf("backlog seq %d not before %d", backlog, first)
	}
}

// TestKeepAlive: a push slower than the ack wait is not redelivered.
func TestKeepAlive(t *testing.T) {
	e := newEnv(t)
	e.snd.fn = func(ctx context.Context, _ Notification, attempt int) error {
		if attempt == 1 {
			select {
			case <-time.After(2500 * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	s := e.service(t)
	s.ackWait = time.Second
	e.run(t, s)
	e.devs.set("bob", Device{"d1", "t1"})
	e.waitAcked(t, e.publish(t, "bob", chat("alice", "bob", "slow")))
	if got := len(e.snd.all()); got != 1 {
		t.Fatalf("%d sends, want 1", got)
	}
	// The consumer sequence counts every delivery, redeliveries included.
	if info := e.consumerInfo(t); info.Delivered.Consumer != 1 {
		t.Fatalf("%d deliveries, want 1", info.Delivered.Consumer)
	}
}

// TestPoisonInput: an undecodable message is terminated, the next one is
// pushed.
func TestPoisonInput(t *testing.T) {
	e := newEnv(t)
	e.run(t, e.service(t))
	e.devs.set("bob", Device{"d1", "t1"})
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if _, err := e.js.Publish(ctx, schema.UserInbox("bob"), []byte{0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	e.waitAcked(t, e.publish(t, "bob", chat("alice", "bob", "fine")))
	if got := len(e.snd.sent()); got != 1 {
		t.Fatalf("%d pushes, want 1", got)
	}
}

// TestLookupFailureRetried: a failing device lookup is retried by
// redelivery and the push happens once it works.
func TestLookupFailureRetried(t *testing.T) {
	e := newEnv(t)
	fd := &failingDevices{fakeDevices: e.devs, fail: 1}
	e.cfg.Devices = fd
	var logs testlog.Buffer
	e.cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	e.run(t, e.service(t))
	e.devs.set("bob", Device{"d1", "t1"})
	e.waitAcked(t, e.publish(t, "bob", chat("alice", "bob", "hi")))
	if got := len(e.snd.sent()); got != 1 {
		t.Fatalf("%d pushes, want 1", got)
	}
	if fd.calls() != 2 {
		t.Fatalf("devices called %d times, want 2", fd.calls())
	}
	// The warning names the message: its subject, stream, sequence, id
	// and the user whose lookup failed.
	line := ""
	for l := range strings.Lines(logs.String()) {
		if strings.Contains(l, "push lookup error") {
			line = l
		}
	}
	for _, want := range []string{"subject=msg.user.bob", "stream=INBOX", "seq=1 ", "msg_id=", "user=bob", "lookup=devices", "err=boom"} {
		if !strings.Contains(line, want) {
			t.Errorf("lookup warning %q lacks %q", line, want)
		}
	}
}

type failingDevices struct {
	*fakeDevices
	mu    sync.Mutex
	fail  int
	count int
}

func (f *failingDevices) Devices(ctx context.Context, u schema.UserID) ([]Device, error) {
	f.mu.Lock()
	f.count++
	fail := f.count <= f.fail
	f.mu.Unlock()
	if fail {
		return nil, errBoom
	}
	return f.fakeDevices.Devices(ctx, u)
}

func (f *failingDevices) calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.count
}

func TestLogSender(t *testing.T) {
	var buf strings.Builder
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}), nil))
	s := NewLogSender(log)
	err := s.Send(context.Background(), Notification{
		Token: "abcdefghijklmnop", Data: map[string]string{DataMessage: `{"secret":"body"}`, DataCount: "3"},
		CollapseKey: "alice", TTL: time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{"push would send", "abcdefgh", "collapse_key=alice", "count=3"} {
		if !strings.Contains(out, want) {
			t.Errorf("log %q lacks %q", out, want)
		}
	}
	for _, bad := range []string{"ijklmnop", "secret"} {
		if strings.Contains(out, bad) {
			t.Errorf("log %q leaks %q", out, bad)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Send(ctx, Notification{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Send on canceled ctx: %v", err)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

var _ io.Writer = writerFunc(nil)

// Device lists are cached for devicesTTL: a burst of lookups for one user
// asks the profile service once, and the answer is not shared between users.
func TestDevicesCache(t *testing.T) {
	devs := &fakeDevices{}
	devs.set("bob", Device{ID: "d1", Token: "t1"})
	devs.set("carol", Device{ID: "d2", Token: "t2"})
	s := &Service{devices: devs}
	for range 50 {
		got, err := s.userDevices(t.Context(), "bob")
		if err != nil || len(got) != 1 || got[0].Token != "t1" {
			t.Fatalf("bob: %v %v", got, err)
		}
	}
	got, err := s.userDevices(t.Context(), "carol")
	if err != nil || len(got) != 1 || got[0].Token != "t2" {
		t.Fatalf("carol: %v %v", got, err)
	}
	if devs.calls != 2 {
		t.Fatalf("%d Devices calls, want 2", devs.calls)
	}
	if n := testing.AllocsPerRun(100, func() { _, _ = s.userDevices(t.Context(), "carol") }); n != 0 {
		t.Fatalf("a cache hit allocates %v times, want 0 (asked once per group member)", n)
	}
}
