package gateway

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/vartalap/vartalap/schema"
)

// onlyConn returns the gateway's single open connection.
func (e *env) onlyConn(t testing.TB) *conn {
	t.Helper()
	var c *conn
	waitFor(t, "one connection", func() bool {
		e.g.mu.Lock()
		defer e.g.mu.Unlock()
		for k := range e.g.conns {
			c = k
		}
		return len(e.g.conns) == 1
	})
	return c
}

// idle reports whether c holds no write goroutine and no queue.
func (c *conn) idle() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.writing && c.q == nil && c.pending == 0
}

// An idle socket has no write goroutine and no queue, yet it is still
// pinged every PingInterval and gets delivered messages at once.
func TestIdleConnection(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.PingInterval = 40 * time.Millisecond }))
	ws := e.dial(t, "", nil)
	var pings atomic.Int32
	ws.SetPingHandler(func(data string) error {
		pings.Add(1)
		return ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	frames := make(chan []byte, 16)
	readerDone := make(chan error, 1)
	go func() {
		for {
			_, data, err := ws.ReadMessage()
			if err != nil {
				readerDone <- err
				return
			}
			frames <- data
		}
	}()
	c := e.onlyConn(t)
	sess := e.del.lastSession(t, "alice")

	for round := range 3 {
		start := pings.Load()
		waitFor(t, "two more pings", func() bool { return pings.Load() >= start+2 })
		waitFor(t, "no writer between pings", c.idle)
		id := "idle" + string(rune('a'+round))
		if !sess.sink.Deliver(&schema.Message{Version: 2.1, ID: id, Type: schema.TypeMessage,
			Channel: schema.ChannelIndividual, Source: "bob", Destination: "alice"}) {
			t.Fatalf("round %d: Deliver to an idle socket refused", round)
		}
		select {
		case data := <-frames:
			m, err := schema.DecodeJSON(data)
			if err != nil || m.ID != id {
				t.Fatalf("round %d: got %q (%v), want message %s", round, data, err, id)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: message not delivered", round)
		}
	}
	waitFor(t, "writer gone after the last message", c.idle)
	_ = ws.Close()
	if err := <-readerDone; err == nil {
		t.Fatal("reader ended without error")
	}
	waitFor(t, "connection gone", func() bool { return e.g.Conns() == 0 })
}

// Frames and a close request a session makes inside Open (before the
// upgrade, when no socket exists yet) are written once the socket runs.
func TestSinkUseBeforeUpgrade(t *testing.T) {
	msg := &schema.Message{Version: 2.1, ID: "early", Type: schema.TypeMessage,
		Channel: schema.ChannelIndividual, Source: "bob", Destination: "alice"}
	cases := []struct {
		name      string
		onOpen    func(Sink)
		wantFrame bool
		wantClose int // 0: the socket stays open
	}{
		{"deliver", func(s Sink) { s.Deliver(msg) }, true, 0},
		{"close", func(s Sink) { s.Close(4002, "replaced by a newer connection") }, false, 4002},
		{"deliver then close", func(s Sink) { s.Deliver(msg); s.Close(4001, "logged out") }, false, 4001},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.del.onOpen = tc.onOpen
			ws := e.dial(t, "", nil)
			if tc.wantFrame {
				_, data := read(t, ws)
				if m, err := schema.DecodeJSON(data); err != nil || m.ID != "early" {
					t.Fatalf("got %q (%v), want message early", data, err)
				}
				expectPong(t, ws)
			}
			if tc.wantClose != 0 {
				// A close request wins over queued frames.
				_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, data, err := ws.ReadMessage()
				var ce *websocket.CloseError
				if !errors.As(err, &ce) || ce.Code != tc.wantClose {
					t.Fatalf("want close %d, got frame %q err %v", tc.wantClose, data, err)
				}
				waitFor(t, "connection gone", func() bool { return e.g.Conns() == 0 })
			}
		})
	}
}
