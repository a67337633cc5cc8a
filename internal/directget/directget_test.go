package directget

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/natstest"
)

func TestScanAndLastMsgs(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.JetStream(t)
	ctx := t.Context()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: "S", Subjects: []string{"s.>"}, AllowDirect: true, Storage: jetstream.FileStorage,
	}); err != nil {
		t.Fatal(err)
	}
	// 2,500 messages on s.a, and one on each of s.k.0 … s.k.1099.
	for i := range 2500 {
		if _, err := js.PublishAsync("s.a", fmt.Appendf(nil, "a%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 1100 {
		if _, err := js.PublishAsync(fmt.Sprintf("s.k.%d", i), []byte("k")); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Fatal("publish timeout")
	}

	t.Run("scan all in batches", func(t *testing.T) {
		var n int
		last := uint64(0)
		end, err := Scan(ctx, js, "S", "s.a", 1, 300, time.Second, func(m *jetstream.RawStreamMsg) bool {
			if m.Sequence <= last || string(m.Data) != fmt.Sprintf("a%d", n) {
				t.Fatalf("message %d: seq %d data %q", n, m.Sequence, m.Data)
			}
			last = m.Sequence
			n++
			return true
		})
		if err != nil || !end || n != 2500 {
			t.Fatalf("end %v err %v n %d", end, err, n)
		}
	})
	t.Run("scan stopped", func(t *testing.T) {
		n := 0
		end, err := Scan(ctx, js, "S", "s.a", 100, 50, time.Second, func(*jetstream.RawStreamMsg) bool { n++; return n < 70 })
		if err != nil || end || n != 70 {
			t.Fatalf("end %v err %v n %d", end, err, n)
		}
	})
	t.Run("scan nothing", func(t *testing.T) {
		end, err := Scan(ctx, js, "S", "s.none", 1, 10, time.Second, func(*jetstream.RawStreamMsg) bool { return true })
		if err != nil || !end {
			t.Fatalf("end %v err %v", end, err)
		}
	})
	t.Run("last of exact subjects", func(t *testing.T) {
		msgs, err := LastMsgs(ctx, js, "S", []string{"s.a", "s.k.5", "s.none"}, time.Second)
		if err != nil || len(msgs) != 2 {
			t.Fatalf("%d messages, err %v", len(msgs), err)
		}
		if msgs[0].Subject != "s.a" || string(msgs[0].Data) != "a2499" || msgs[1].Subject != "s.k.5" {
			t.Fatalf("got %s=%q, %s", msgs[0].Subject, msgs[0].Data, msgs[1].Subject)
		}
	})
	t.Run("too many subjects", func(t *testing.T) {
		if _, err := LastMsgs(ctx, js, "S", []string{"s.k.*"}, time.Second); !errors.Is(err, ErrTooManySubjects) {
			t.Fatalf("err %v, want ErrTooManySubjects", err)
		}
	})
	t.Run("no match", func(t *testing.T) {
		msgs, err := LastMsgs(ctx, js, "S", []string{"s.none.*"}, time.Second)
		if err != nil || len(msgs) != 0 {
			t.Fatalf("%d messages, err %v", len(msgs), err)
		}
	})
}

func TestAPIPrefix(t *testing.T) {
	srv := natstest.Start(t)
	nc, _ := srv.JetStream(t)
	for _, tc := range []struct{ prefix, domain, want string }{
		{"", "", "$JS.API."},
		{"$JS.hub.API", "", "$JS.hub.API."},
		{"$JS.hub.API.", "", "$JS.hub.API."},
		{"", "leaf", "$JS.leaf.API."},
	} {
		var js jetstream.JetStream
		var err error
		switch {
		case tc.domain != "":
			js, err = jetstream.NewWithDomain(nc, tc.domain)
		case tc.prefix != "":
			js, err = jetstream.NewWithAPIPrefix(nc, tc.prefix)
		default:
			js, err = jetstream.New(nc)
		}
		if err != nil {
			t.Fatal(err)
		}
		if got := APIPrefix(js); got != tc.want {
			t.Errorf("%+v: got %q want %q", tc, got, tc.want)
		}
	}
}
