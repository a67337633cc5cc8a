package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

// testAuth knows a few fixed access keys. The user "broken" makes the
// backend fail (503 path).
type testAuth struct{}

var testKeys = map[string]api.Identity{
	"alice/ka":   {User: "alice", Device: "phone"},
	"bob/kb":     {User: "bob"}, // empty device: the gateway uses "default"
	"+919999/kp": {User: "+919999", Device: "web"},
}

func (testAuth) Authenticate(_ context.Context, user, key string) (api.Identity, error) {
	if user == "broken" {
		return api.Identity{}, errors.New("auth backend down")
	}
	id, ok := testKeys[user+"/"+key]
	if !ok {
		return api.Identity{}, fmt.Errorf("user %s: %w", user, api.ErrUnauthenticated)
	}
	return id, nil
}

// memDeliverer stands in for the delivery service (another package): it
// records sessions, their acks and REST acks.
type memDeliverer struct {
	mu       sync.Mutex
	sessions []*memSession
	restAcks []restAck
	openErr  error
	onOpen   func(Sink) // called by Open before it returns (before the upgrade)
	// overloaded is what Overloaded reports (see Overloader).
	overloaded atomic.Bool
}

func (d *memDeliverer) Overloaded() bool { return d.overloaded.Load() }

type restAck struct {
	user   schema.UserID
	device schema.DeviceID
	ids    []string
}

type memSession struct {
	user   schema.UserID
	device schema.DeviceID
	sink   Sink

	mu     sync.Mutex
	acks   []string
	closed bool
}

func (d *memDeliverer) Open(_ context.Context, user schema.UserID, device schema.DeviceID, sink Sink) (Session, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.openErr != nil {
		return nil, d.openErr
	}
	s := &memSession{user: user, device: device, sink: sink}
	d.sessions = append(d.sessions, s)
	if d.onOpen != nil {
		d.onOpen(sink)
	}
	return s, nil
}

func (d *memDeliverer) AckByID(_ context.Context, user schema.UserID, device schema.DeviceID, ids []string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.restAcks = append(d.restAcks, restAck{user, device, append([]string(nil), ids...)})
	return nil
}

func (s *memSession) Ack(ids ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.acks = append(s.acks, ids...)
}

func (s *memSession) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
}

func (s *memSession) state() (acks []string, closed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.acks...), s.closed
}

// lastSession returns the newest session of user, waiting for it.
func (d *memDeliverer) lastSession(t testing.TB, user schema.UserID) *memSession {
	t.Helper()
	var s *memSession
	waitFor(t, "session of "+string(user), func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		for i := len(d.sessions) - 1; i >= 0; i-- {
			if d.sessions[i].user == user {
				s = d.sessions[i]
				return true
			}
		}
		return false
	})
	return s
}

// waitFor polls cond until it holds or 10s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type env struct {
	srv    *httptest.Server
	g      *Gateway
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream // nil without CHAT_IN
	del    *memDeliverer
}

type envOpt func(*Config, *envFlags)

type envFlags struct{ noStream bool }

func withoutStream() envOpt { return func(_ *Config, f *envFlags) { f.noStream = true } }

func withConfig(fn func(*Config)) envOpt { return func(c *Config, _ *envFlags) { fn(c) } }

// newEnv starts embedded JetStream, the CHAT_IN stream, a Gateway mounted
// under a chi router with api.StripVersion, and an HTTP test server. It
// checks for leaked goroutines after everything is shut down.
func newEnv(t testing.TB, opts ...envOpt) *env {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })

	ns := natstest.Start(t)
	nc, js := ns.JetStream(t)
	e := &env{nc: nc, js: js, del: &memDeliverer{}}
	cfg := Config{JS: js, Auth: testAuth{}, Delivery: e.del}
	var flags envFlags
	for _, o := range opts {
		o(&cfg, &flags)
	}
	if !flags.noStream {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := js.CreateStream(ctx, jetstream.StreamConfig{
			Name:               schema.StreamChatIn,
			Subjects:           []string{schema.SubjectChatInAll},
			Retention:          jetstream.LimitsPolicy,
			Storage:            jetstream.FileStorage,
			Duplicates:         2 * time.Minute,
			AllowAtomicPublish: true,
		})
		if err != nil {
			t.Fatalf("create stream: %v", err)
		}
		e.stream = s
	}
	g, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	e.g = g
	root := chi.NewRouter()
	root.Use(api.StripVersion)
	g.Routes(root)
	e.srv = httptest.NewServer(root)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := g.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		e.srv.Close()
	})
	return e
}

func (e *env) wsURL(path string) string {
	return "ws" + strings.TrimPrefix(e.srv.URL, "http") + path
}

func credHeader(user, key string) http.Header {
	h := http.Header{}
	h.Set("user", user)
	h.Set("accesskey", key)
	return h
}

// dial opens a WebSocket as alice (unless h says otherwise) on /wss/?query.
func (e *env) dial(t testing.TB, query string, h http.Header) *websocket.Conn {
	t.Helper()
	if h == nil {
		h = credHeader("alice", "ka")
	}
	ws, resp, err := websocket.DefaultDialer.Dial(e.wsURL("/wss/?"+query), h)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial: %v (status %d)", err, status)
	}
	t.Cleanup(func() { _ = ws.Close() })
	return ws
}

// read returns the next frame, failing after 10s.
func read(t testing.TB, ws *websocket.Conn) (int, []byte) {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	typ, data, err := ws.ReadMessage()
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return typ, data
}

func write(t testing.TB, ws *websocket.Conn, typ int, data []byte) {
	t.Helper()
	if err := ws.WriteMessage(typ, data); err != nil {
		t.Fatalf("write: %v", err)
	}
}

func writeText(t testing.TB, ws *websocket.Conn, s string) {
	write(t, ws, websocket.TextMessage, []byte(s))
}

// expectPong sends "ping" and requires the very next frame to be "pong":
// it proves no other frame (ack, error) was queued before.
func expectPong(t testing.TB, ws *websocket.Conn) {
	t.Helper()
	writeText(t, ws, "ping")
	typ, data := read(t, ws)
	if typ != websocket.TextMessage || string(data) != "pong" {
		t.Fatalf("want text pong, got type %d %q", typ, data)
	}
}

// chatJSON is a v2.1 chat message from alice's client that claims to come
// from mallory.
func chatJSON(id, to string) string {
	return `{"_v":2.1,"id":"` + id + `","head":{"type":"INDIVIDUAL","to":"` + to +
		`","from":"mallory","chatid":"c1","contentType":"text","action":"message"},"body":{"text":"hi"}}`
}

// storedMsg is one client message stored in CHAT_IN: on its own or as an
// entry of a gateway batch.
type storedMsg struct {
	Subject string
	Batch   bool
	Device  schema.DeviceID
	Data    []byte
}

// stored returns every client message in CHAT_IN, in order.
func (e *env) stored(t testing.TB) []storedMsg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := e.stream.Info(ctx)
	if err != nil {
		t.Fatalf("stream info: %v", err)
	}
	var out []storedMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		raw, err := e.stream.GetMsg(ctx, seq)
		if err != nil {
			t.Fatalf("get msg %d: %v", seq, err)
		}
		if raw.Header.Get(schema.HeaderBatch) == "" {
			out = append(out, storedMsg{Subject: raw.Subject, Device: schema.DeviceID(raw.Header.Get(schema.HeaderDevice)), Data: raw.Data})
			continue
		}
		entries, err := schema.ParseBatch(raw.Data)
		if err != nil {
			t.Fatalf("batch at seq %d: %v", seq, err)
		}
		for _, en := range entries {
			out = append(out, storedMsg{Subject: raw.Subject, Batch: true, Device: en.Device, Data: en.Message})
		}
	}
	return out
}

// streamMsgs returns the number of client messages stored in CHAT_IN.
func (e *env) streamMsgs(t testing.TB) uint64 {
	t.Helper()
	return uint64(len(e.stored(t)))
}

// lastStored returns the newest client message in CHAT_IN, decoded.
func (e *env) lastStored(t testing.TB) (storedMsg, *schema.Message) {
	t.Helper()
	all := e.stored(t)
	if len(all) == 0 {
		t.Fatal("CHAT_IN holds no message")
	}
	last := all[len(all)-1]
	m, err := schema.UnmarshalProto(last.Data)
	if err != nil {
		t.Fatalf("stored message does not decode: %v", err)
	}
	return last, m
}

// notice is an error frame as a client sees it.
type notice struct{ id, code, action string }

// parseNotice decodes an error notice frame in either format.
func parseNotice(t testing.TB, typ int, data []byte) notice {
	t.Helper()
	if typ == websocket.BinaryMessage {
		m, err := schema.UnmarshalProto(data)
		if err != nil {
			t.Fatalf("notice does not decode: %v", err)
		}
		if m.Type != schema.TypeNotification || m.Source != schema.ServerSource {
			t.Fatalf("notice: type %v from %q", m.Type, m.Source)
		}
		return notice{id: m.ID, code: m.Meta["code"], action: m.Meta[schema.MetaAction]}
	}
	var v struct {
		ID   string `json:"id"`
		Head struct {
			From   string `json:"from"`
			Action string `json:"action"`
		} `json:"head"`
		Body struct {
			Code string `json:"code"`
			ID   string `json:"id"`
		} `json:"body"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("notice is not JSON: %v: %s", err, data)
	}
	if v.Body.ID != v.ID || v.Head.From != schema.ServerSource {
		t.Fatalf("notice: body id %q vs id %q, from %q", v.Body.ID, v.ID, v.Head.From)
	}
	return notice{id: v.ID, code: v.Body.Code, action: v.Head.Action}
}

// parseAck decodes a SERVER_ACK frame in either format.
func parseAck(t testing.TB, typ int, data []byte) *schema.Message {
	t.Helper()
	if typ == websocket.BinaryMessage {
		m, err := schema.UnmarshalProto(data)
		if err != nil {
			t.Fatalf("ack does not decode: %v", err)
		}
		if m.Type != schema.TypeServerAck {
			t.Fatalf("want SERVER_ACK, got %v", m.Type)
		}
		return m
	}
	var v struct {
		ID   string `json:"id"`
		Head struct {
			ContentType string `json:"contentType"`
			To          string `json:"to"`
			From        string `json:"from"`
		} `json:"head"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("ack is not JSON: %v: %s", err, data)
	}
	if v.Head.ContentType != "SERVER_ACK" {
		t.Fatalf("want SERVER_ACK, got %s", data)
	}
	return &schema.Message{ID: v.ID, Type: schema.TypeServerAck, Source: v.Head.From, Destination: v.Head.To}
}
