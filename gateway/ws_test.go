package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/vartalap/vartalap/schema"
)

// seedServerAck is the seed's [verified] SERVER_ACK JSON (seed-spec §3.7)
// for message m1 from alice.
const seedServerAck = `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","from":"server","to":"alice","contentType":"SERVER_ACK","ephemeral":true,"category":"message"},"body":{},"from":"server","to":"alice","msgId":"m1","type":"SERVER_ACK","module":"INDIVIDUAL","chatType":"INDIVIDUAL"}`

// protoHasField reports whether the protobuf encoding b carries field num.
func protoHasField(t testing.TB, b []byte, num protowire.Number) bool {
	t.Helper()
	for len(b) > 0 {
		n, typ, l := protowire.ConsumeTag(b)
		if l < 0 {
			t.Fatalf("bad protobuf tag")
		}
		if n == num {
			return true
		}
		b = b[l:]
		l = protowire.ConsumeFieldValue(n, typ, b)
		if l < 0 {
			t.Fatalf("bad protobuf field %d", n)
		}
		b = b[l:]
	}
	return false
}

func TestWebSocketPublish(t *testing.T) {
	e := newEnv(t)
	spoofed := func(id string) []byte {
		return (&schema.Message{Version: 3, ID: id, Type: schema.TypeMessage, Channel: schema.ChannelIndividual,
			Source: "mallory", Destination: "bob", Content: []byte(`{"text":"hi"}`), Timestamp: 1700000000000}).MarshalProto()
	}
	cases := []struct {
		name       string
		user, key  string
		query      string
		frameType  int
		frame      []byte
		ack        bool
		wantDevice string
	}{
		{"text with ack", "alice", "ka", "format=text&ack=true", websocket.TextMessage, []byte(chatJSON("m1", "bob")),
			true, "phone"},
		{"text without ack", "alice", "ka", "ack=false", websocket.TextMessage, []byte(chatJSON("m2", "bob")),
			false, "phone"},
		{"binary with ack", "alice", "ka", "format=binary&ack=true", websocket.BinaryMessage, spoofed("m3"),
			true, "phone"},
		{"binary without ack", "alice", "ka", "format=binary", websocket.BinaryMessage, spoofed("m4"),
			false, "phone"},
		{"binary frame on text socket", "alice", "ka", "ack=true", websocket.BinaryMessage, spoofed("m5"),
			true, "phone"},
		{"empty device becomes default", "bob", "kb", "ack=true", websocket.TextMessage, []byte(chatJSON("m6", "alice")),
			true, "default"},
		{"encoded user token", "+919999", "kp", "ack=true", websocket.TextMessage, []byte(chatJSON("m7", "bob")),
			true, "web"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ws := e.dial(t, tc.query, credHeader(tc.user, tc.key))
			before := e.streamMsgs(t)
			write(t, ws, tc.frameType, tc.frame)
			if tc.ack {
				typ, data := read(t, ws)
				// The ack means "stored": the message must already be in CHAT_IN.
				if got := e.streamMsgs(t); got != before+1 {
					t.Fatalf("SERVER_ACK arrived with %d messages in CHAT_IN, want %d", got, before+1)
				}
				wantType := websocket.TextMessage
				if strings.Contains(tc.query, "format=binary") {
					wantType = websocket.BinaryMessage
				}
				if typ != wantType {
					t.Fatalf("ack frame type %d, want %d", typ, wantType)
				}
				ack := parseAck(t, typ, data)
				_, stored := e.lastStored(t)
				if ack.ID != stored.ID || ack.Destination != tc.user || ack.Source != schema.ServerSource {
					t.Fatalf("ack %+v does not answer %q from %s", ack, stored.ID, tc.user)
				}
				if typ == websocket.BinaryMessage {
					if !protoHasField(t, data, 3) {
						t.Fatal("binary SERVER_ACK lacks an explicit type field (seed clients need type=0)")
					}
					if ack.ServerID != stored.ServerID || ack.ServerTimestamp != stored.ServerTimestamp {
						t.Fatalf("ack server id/ts %q/%d, stored %q/%d", ack.ServerID, ack.ServerTimestamp, stored.ServerID, stored.ServerTimestamp)
					}
				}
			}
			// Nothing else may be queued before the pong (no ack without ack=true).
			expectPong(t, ws)
			// Without ack=true nothing says when the commit is done: the
			// read loop does not wait for it, so the pong may come first.
			waitFor(t, "the message in CHAT_IN", func() bool { return e.streamMsgs(t) == before+1 })
			if got := e.streamMsgs(t); got != before+1 {
				t.Fatalf("CHAT_IN has %d messages, want %d", got, before+1)
			}
			raw, m := e.lastStored(t)
			if raw.Subject != schema.ChatInBatch("gateway") || !raw.Batch {
				t.Errorf("subject %q (batch %v), want a batch on %q", raw.Subject, raw.Batch, schema.ChatInBatch("gateway"))
			}
			if raw.Device != schema.DeviceID(tc.wantDevice) {
				t.Errorf("device %q, want %q", raw.Device, tc.wantDevice)
			}
			if m.Source != tc.user {
				t.Errorf("stored source %q, want the authenticated %q", m.Source, tc.user)
			}
			if m.ServerID == "" || m.ServerTimestamp == 0 {
				t.Errorf("stored message not stamped: %+v", m)
			}
		})
	}
}

func TestServerAckSeedShape(t *testing.T) {
	e := newEnv(t)
	ws := e.dial(t, "ack=true", nil)
	writeText(t, ws, chatJSON("m1", "bob"))
	_, data := read(t, ws)
	var got, want map[string]any
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatalf("ack is not JSON: %v", err)
	}
	if ts, ok := got["serverTimestamp"].(float64); !ok || ts <= 0 {
		t.Fatalf("ack lacks serverTimestamp: %s", data)
	}
	delete(got, "serverTimestamp") // our addition to the seed shape
	if err := json.Unmarshal([]byte(seedServerAck), &want); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("SERVER_ACK\n got %s\nwant %s", data, seedServerAck)
	}
}

// A resend is acked again and handed to the router again, which stores one
// copy per recipient (router.TestBatchResendStoredOnce, and end to end in
// cmd/vartalap TestResendDeliveredOnce).
func TestResendSameID(t *testing.T) {
	e := newEnv(t)
	ws := e.dial(t, "ack=true", nil)
	for range 2 {
		writeText(t, ws, chatJSON("dup-1", "bob"))
		typ, data := read(t, ws)
		if ack := parseAck(t, typ, data); ack.ID != "dup-1" {
			t.Fatalf("ack for %q", ack.ID)
		}
	}
	if got := e.streamMsgs(t); got != 2 {
		t.Fatalf("CHAT_IN has %d messages after a resend, want 2", got)
	}
}

func TestEphemeral(t *testing.T) {
	e := newEnv(t)
	sub, err := e.nc.SubscribeSync(schema.Live("alice"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	ws := e.dial(t, "ack=true", nil)
	writeText(t, ws, `{"_v":2.1,"id":"t1","head":{"type":"INDIVIDUAL","to":"bob","from":"mallory","contentType":"typing","ephemeral":true},"body":{}}`)
	typ, data := read(t, ws)
	if ack := parseAck(t, typ, data); ack.ID != "t1" {
		t.Fatalf("ack for %q", ack.ID)
	}
	msg, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no live message: %v", err)
	}
	m, err := schema.UnmarshalProto(msg.Data)
	if err != nil {
		t.Fatal(err)
	}
	if m.Source != "alice" || !m.Ephemeral || m.ID != "t1" {
		t.Fatalf("live message %+v", m)
	}
	if got := msg.Header.Get(schema.HeaderDevice); got != "phone" {
		t.Fatalf("device header %q", got)
	}
	if got := e.streamMsgs(t); got != 0 {
		t.Fatalf("ephemeral message stored: CHAT_IN has %d", got)
	}
}

func TestClientAckGoesToSession(t *testing.T) {
	e := newEnv(t)
	ws := e.dial(t, "ack=true&format=binary", nil)
	sess := e.del.lastSession(t, "alice")
	writeText(t, ws, `{"_v":2.1,"id":"got-1","head":{"contentType":"client_ack","to":"server"},"body":{}}`)
	write(t, ws, websocket.BinaryMessage, (&schema.Message{Version: 2.1, ID: "got-2", Type: schema.TypeClientAck,
		Channel: schema.ChannelIndividual, Ephemeral: true, Destination: "server"}).MarshalProto())
	expectPong(t, ws) // no SERVER_ACK for client acks
	acks, _ := sess.state()
	if !reflect.DeepEqual(acks, []string{"got-1", "got-2"}) {
		t.Fatalf("session acks %v", acks)
	}
	if got := e.streamMsgs(t); got != 0 {
		t.Fatalf("client ack published: CHAT_IN has %d", got)
	}
}

func TestErrorFrames(t *testing.T) {
	const maxFrame = 2048
	e := newEnv(t, withConfig(func(c *Config) { c.MaxFrameBytes = maxFrame }))
	big := `{"_v":2.1,"id":"big","head":{"to":"bob"},"body":{"text":"` + strings.Repeat("x", maxFrame) + `"}}`
	cases := []struct {
		name     string
		typ      int
		frame    string
		wantCode string
		wantID   string
	}{
		{"not json", websocket.TextMessage, "hello", schema.CodeMalformed, ""},
		{"json array", websocket.TextMessage, `[1,2]`, schema.CodeMalformed, ""},
		{"missing to", websocket.TextMessage, `{"_v":2.1,"id":"e1","head":{"type":"INDIVIDUAL","contentType":"text"},"body":{}}`, schema.CodeMissingTo, "e1"},
		{"unsafe to", websocket.TextMessage, chatJSON("e2", "bob.*"), schema.CodeBadTo, "e2"},
		{"unknown channel", websocket.TextMessage, `{"_v":2.1,"id":"e3","head":{"type":"SPACESHIP","to":"bob"},"body":{}}`, schema.CodeBadChannel, "e3"},
		{"server ack from client", websocket.TextMessage, `{"_v":2.1,"id":"e4","head":{"to":"bob","contentType":"SERVER_ACK"},"body":{}}`, schema.CodeBadType, "e4"},
		{"bad ephemeral", websocket.TextMessage, `{"_v":2.1,"id":"e5","head":{"to":"bob","ephemeral":"maybe"},"body":{}}`, schema.CodeBadEphemeral, "e5"},
		{"missing id", websocket.TextMessage, `{"_v":2.1,"head":{"to":"bob"},"body":{}}`, schema.CodeMissingID, ""},
		{"unsafe id is not echoed", websocket.TextMessage, chatJSON("a b", "bob"), schema.CodeBadID, ""},
		{"oversized frame", websocket.TextMessage, big, schema.CodeTooLarge, ""},
		{"binary garbage", websocket.BinaryMessage, "\xff\xff\xff\xff", schema.CodeMalformed, ""},
		{"binary missing to", websocket.BinaryMessage, string((&schema.Message{ID: "e6", Type: schema.TypeMessage}).MarshalProto()), schema.CodeMissingTo, "e6"},
	}
	for _, format := range []string{"text", "binary"} {
		t.Run(format, func(t *testing.T) {
			ws := e.dial(t, "ack=true&format="+format, nil)
			for i, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					write(t, ws, tc.typ, []byte(tc.frame))
					typ, data := read(t, ws)
					if (format == "binary") != (typ == websocket.BinaryMessage) {
						t.Fatalf("notice frame type %d on a %s socket", typ, format)
					}
					n := parseNotice(t, typ, data)
					if n.code != tc.wantCode || n.id != tc.wantID || n.action != "error" {
						t.Fatalf("notice %+v, want code %q id %q", n, tc.wantCode, tc.wantID)
					}
					// The socket stays usable.
					id := format + "-ok-" + string(rune('a'+i))
					writeText(t, ws, chatJSON(id, "bob"))
					typ, data = read(t, ws)
					if ack := parseAck(t, typ, data); ack.ID != id {
						t.Fatalf("ack for %q, want %q", ack.ID, id)
					}
				})
			}
		})
	}
}

func TestFrameOverHardLimitCloses(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.MaxFrameBytes = 1024 }))
	ws := e.dial(t, "", nil)
	if e.g.hardLimit != 1<<20 {
		t.Fatalf("hard limit %d, want 1 MiB", e.g.hardLimit)
	}
	// The server may close before the whole frame is written.
	_ = ws.WriteMessage(websocket.TextMessage, bytes.Repeat([]byte("x"), 1<<20+1))
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, err := ws.ReadMessage()
	if !websocket.IsCloseError(err, websocket.CloseMessageTooBig) {
		t.Fatalf("want close 1009, got %v", err)
	}
	waitFor(t, "connection gone", func() bool { return e.g.Conns() == 0 })
}

func TestRateLimit(t *testing.T) {
	// Burst 1 and a refill far beyond the test's duration.
	e := newEnv(t, withConfig(func(c *Config) { c.RatePerSecond = 0.001 }))
	ws := e.dial(t, "ack=true", nil)
	writeText(t, ws, chatJSON("r1", "bob"))
	typ, data := read(t, ws)
	if ack := parseAck(t, typ, data); ack.ID != "r1" {
		t.Fatalf("ack for %q", ack.ID)
	}
	writeText(t, ws, chatJSON("r2", "bob"))
	typ, data = read(t, ws)
	if n := parseNotice(t, typ, data); n.code != schema.CodeRateLimited || n.id != "r2" {
		t.Fatalf("notice %+v, want rate_limited for r2", n)
	}
	// Client acks are not limited, and the connection stays.
	writeText(t, ws, `{"_v":2.1,"id":"seen-1","head":{"contentType":"CLIENT_ACK"}}`)
	expectPong(t, ws)
	if acks, _ := e.del.lastSession(t, "alice").state(); !reflect.DeepEqual(acks, []string{"seen-1"}) {
		t.Fatalf("session acks %v", acks)
	}
	if got := e.streamMsgs(t); got != 1 {
		t.Fatalf("CHAT_IN has %d, want 1", got)
	}
}

func TestDeliverFormats(t *testing.T) {
	e := newEnv(t)
	m := &schema.Message{Version: 2.1, ID: "d1", Type: schema.TypeMessage, Channel: schema.ChannelIndividual,
		Source: "bob", Destination: "alice", Content: []byte(`{"text":"hello"}`), Timestamp: 1700000000000,
		Meta: map[string]string{"chatid": "c9", "contentType": "text"}, ServerID: "s1", ServerTimestamp: 1700000000001}
	cases := []struct {
		name     string
		query    string
		wantType int
		want     []byte
	}{
		{"text", "format=text", websocket.TextMessage, schema.RenderJSON(m)},
		{"binary", "format=binary", websocket.BinaryMessage, m.MarshalProto()},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ws := e.dial(t, tc.query, nil)
			sess := e.del.lastSession(t, "alice")
			if sess.device != "phone" {
				t.Fatalf("session device %q", sess.device)
			}
			if !sess.sink.Deliver(m) {
				t.Fatal("Deliver on an idle socket returned false")
			}
			typ, data := read(t, ws)
			if typ != tc.wantType || !bytes.Equal(data, tc.want) {
				t.Fatalf("got type %d %q\nwant type %d %q", typ, data, tc.wantType, tc.want)
			}
		})
	}
}

func TestSinkClose(t *testing.T) {
	e := newEnv(t)
	ws := e.dial(t, "", nil)
	sess := e.del.lastSession(t, "alice")
	sess.sink.Close(4002, "replaced by a newer connection")
	sess.sink.Close(4001, "second call is ignored")
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, err := ws.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 4002 || ce.Text != "replaced by a newer connection" {
		t.Fatalf("want close 4002, got %v", err)
	}
	waitFor(t, "session closed", func() bool { _, closed := sess.state(); return closed })
	waitFor(t, "connection gone", func() bool { return e.g.Conns() == 0 })
	if sess.sink.Deliver(&schema.Message{ID: "late"}) {
		t.Fatal("Deliver after close returned true")
	}
}

func TestSlowConsumer(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) {
		c.OutboundQueue = 4
		c.WriteTimeout = 500 * time.Millisecond
	}))
	_ = e.dial(t, "", nil) // never reads
	sess := e.del.lastSession(t, "alice")
	m := &schema.Message{Version: 2.1, ID: "big", Type: schema.TypeMessage, Channel: schema.ChannelIndividual,
		Source: "bob", Destination: "alice", Content: []byte(`{"text":"` + strings.Repeat("y", 256<<10) + `"}`)}
	accepted := 0
	waitFor(t, "a full outbound queue", func() bool {
		if sess.sink.Deliver(m) {
			accepted++
			return false
		}
		return true
	})
	if accepted < 4 {
		t.Fatalf("queue refused after %d frames, want at least OutboundQueue=4", accepted)
	}
	// The delivery service answers a full queue by closing the sink.
	sess.sink.Close(1013, "slow consumer")
	waitFor(t, "slow connection dropped", func() bool { return e.g.Conns() == 0 })
	waitFor(t, "session closed", func() bool { _, closed := sess.state(); return closed })
}

func TestWebSocketAuth(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.AllowedOrigins = []string{"https://app.example.com"} }))
	withOrigin := func(h http.Header, origin string) http.Header { h.Set("Origin", origin); return h }
	cookies := http.Header{}
	cookies.Set("Cookie", "user=alice; accesskey=ka")
	host := strings.TrimPrefix(e.srv.URL, "http://")
	cases := []struct {
		name       string
		path       string
		header     http.Header
		wantStatus int // 0 = upgrade succeeds
		wantCode   string
	}{
		{"headers", "/wss/", credHeader("alice", "ka"), 0, ""},
		{"no trailing slash", "/wss", credHeader("alice", "ka"), 0, ""},
		{"v1.0 prefix", "/v1.0/wss/?ack=true", credHeader("alice", "ka"), 0, ""},
		{"cookies", "/wss/", cookies, 0, ""},
		{"missing credentials", "/wss/", http.Header{}, http.StatusUnauthorized, "unauthenticated"},
		{"missing key", "/wss/", credHeader("alice", ""), http.StatusUnauthorized, "unauthenticated"},
		{"wrong key", "/wss/", credHeader("alice", "kb"), http.StatusUnauthorized, "unauthenticated"},
		{"auth backend down", "/wss/", credHeader("broken", "x"), http.StatusServiceUnavailable, "unavailable"},
		{"same origin", "/wss/", withOrigin(credHeader("alice", "ka"), "http://"+host), 0, ""},
		{"allowed origin", "/wss/", withOrigin(credHeader("alice", "ka"), "https://APP.example.com"), 0, ""},
		{"foreign origin", "/wss/", withOrigin(credHeader("alice", "ka"), "https://evil.example.com"), http.StatusForbidden, "forbidden"},
		{"origin suffix trick", "/wss/", withOrigin(credHeader("alice", "ka"), "http://"+host+".evil.com"), http.StatusForbidden, "forbidden"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ws, resp, err := websocket.DefaultDialer.Dial(e.wsURL(tc.path), tc.header)
			if tc.wantStatus == 0 {
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				defer ws.Close()
				expectPong(t, ws)
				return
			}
			if err == nil {
				ws.Close()
				t.Fatal("upgrade succeeded, want rejection")
			}
			if resp == nil || resp.StatusCode != tc.wantStatus {
				t.Fatalf("dial error %v, response %v, want status %d", err, resp, tc.wantStatus)
			}
			var body struct {
				Status bool   `json:"status"`
				Error  string `json:"error"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
				t.Fatalf("error body is not JSON: %v", err)
			}
			if body.Status || body.Error != tc.wantCode {
				t.Fatalf("error body %+v, want code %q", body, tc.wantCode)
			}
		})
	}
	e.del.mu.Lock()
	n := len(e.del.sessions)
	e.del.mu.Unlock()
	if n != 6 {
		t.Fatalf("%d sessions opened, want 6 (one per accepted upgrade)", n)
	}
}

func TestDeliveryUnavailable(t *testing.T) {
	e := newEnv(t)
	e.del.openErr = errors.New("delivery down")
	_, resp, err := websocket.DefaultDialer.Dial(e.wsURL("/wss/"), credHeader("alice", "ka"))
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("want 503 before upgrade, got %v %v", err, resp)
	}
}

func TestStreamMissing(t *testing.T) {
	e := newEnv(t, withoutStream(), withConfig(func(c *Config) { c.PublishTimeout = 2 * time.Second }))
	ws := e.dial(t, "ack=true", nil)
	writeText(t, ws, chatJSON("u1", "bob"))
	typ, data := read(t, ws)
	if n := parseNotice(t, typ, data); n.code != schema.CodeUnavailable || n.id != "u1" {
		t.Fatalf("notice %+v, want unavailable for u1", n)
	}
	expectPong(t, ws)

	status, body := e.post(t, "/messages?ack=true", credHeader("alice", "ka"), `[`+jsonString(chatJSON("u2", "bob"))+`]`)
	if status != http.StatusServiceUnavailable {
		t.Fatalf("REST status %d, want 503: %s", status, body)
	}
	var resp restResponse
	if err := json.Unmarshal(body, &resp); err != nil {
		t.Fatal(err)
	}
	if resp.Error != schema.CodeUnavailable || len(resp.Errors) != 1 || resp.Errors[0].ID != "u2" || len(resp.Acks) != 0 {
		t.Fatalf("REST body %s", body)
	}
}

func TestShutdown(t *testing.T) {
	e := newEnv(t)
	a := e.dial(t, "", nil)
	b := e.dial(t, "format=binary", credHeader("bob", "kb"))
	sa, sb := e.del.lastSession(t, "alice"), e.del.lastSession(t, "bob")
	waitFor(t, "two connections", func() bool { return e.g.Conns() == 2 })
	done := make(chan error, 1)
	go func() {
		ctx, cancel := contextWithTimeout(10 * time.Second)
		defer cancel()
		done <- e.g.Shutdown(ctx)
	}()
	for _, ws := range []*websocket.Conn{a, b} {
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, _, err := ws.ReadMessage()
		if !websocket.IsCloseError(err, websocket.CloseGoingAway) {
			t.Fatalf("want close 1001, got %v", err)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if n := e.g.Conns(); n != 0 {
		t.Fatalf("%d connections after shutdown", n)
	}
	for _, s := range []*memSession{sa, sb} {
		if _, closed := s.state(); !closed {
			t.Fatalf("session of %s not closed", s.user)
		}
	}
	_, resp, err := websocket.DefaultDialer.Dial(e.wsURL("/wss/"), credHeader("alice", "ka"))
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("upgrade after shutdown: %v %v, want 503", err, resp)
	}
}
