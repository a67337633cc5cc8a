package main

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/internal/testlog"
)

const wait = 10 * time.Second

// Two users log in and chat, a text client and a binary client; the sender
// cannot spoof its identity; acks remove messages for good.
func TestChatTextAndBinary(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "phone")
	kb := login(t, s, "bob", "phone")
	alice := dial(t, s, "alice", ka, false)
	bob := dial(t, s, "bob", kb, true)

	// head.from claims mallory: the server must overwrite it.
	msg := `{"_v":2.1,"id":"a1","head":{"type":"INDIVIDUAL","to":"bob","from":"mallory","contentType":"text","action":"message","chatid":"c1"},"body":{"text":"hi bob"}}`
	if err := alice.conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatal(err)
	}
	alice.expectServerAck("a1", wait)
	got := bob.expect(wait)
	if got.ID != "a1" || got.Source != "alice" || got.Destination != "bob" || bodyText(got) != "hi bob" {
		t.Fatalf("bob got %+v (body %s)", got, got.Content)
	}
	if got.ServerID == "" || got.ServerTimestamp == 0 {
		t.Fatalf("binary delivery lacks server id/timestamp: %+v", got)
	}
	bob.ack("a1")

	bob.sendProto("b1", "alice", "hi alice")
	bob.expectServerAck("b1", wait)
	got = alice.expect(wait)
	if got.ID != "b1" || got.Source != "bob" || bodyText(got) != "hi alice" {
		t.Fatalf("alice got %+v", got)
	}
	alice.ack("b1")

	// Text ping → pong.
	if err := alice.conn.WriteMessage(websocket.TextMessage, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	select {
	case f := <-alice.in:
		if string(f.data) != "pong" {
			t.Fatalf("ping answered with %q", f.data)
		}
	case <-time.After(wait):
		t.Fatal("no pong")
	}

	// Acked messages are not delivered again on reconnect.
	bob.Close()
	alice.Close()
	bob2 := dial(t, s, "bob", kb, true)
	bob2.expectNothing(500 * time.Millisecond)
}

// Messages to an offline user wait in the inbox and arrive in order on
// connect; unacked ones come again on the next connection, acked ones never.
func TestOfflineSyncAndRedelivery(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")
	alice := dial(t, s, "alice", ka, false)
	const n = 20
	for i := range n {
		alice.sendJSON(fmt.Sprintf("m%02d", i), "bob", fmt.Sprintf("text %d", i))
		alice.expectServerAck(fmt.Sprintf("m%02d", i), wait)
	}
	bob := dial(t, s, "bob", kb, false)
	for i := range n {
		m := bob.expect(wait)
		if want := fmt.Sprintf("m%02d", i); m.ID != want {
			t.Fatalf("message %d: got id %s, want %s", i, m.ID, want)
		}
		if i%2 == 0 {
			bob.ack(m.ID)
		}
	}
	// Let the server read the acks still in flight on this socket: a new
	// connection that overtakes them gets those messages again (at least
	// once). Closing the socket then flushes the device's cursor.
	time.Sleep(300 * time.Millisecond)
	bob.Close()
	bob = dial(t, s, "bob", kb, false)
	for i := 1; i < n; i += 2 {
		m := bob.expect(wait)
		if want := fmt.Sprintf("m%02d", i); m.ID != want {
			t.Fatalf("redelivery: got id %s, want %s", m.ID, want)
		}
		bob.ack(m.ID)
	}
	bob.expectNothing(300 * time.Millisecond)
}

// Every device of a user gets every message; acks are per device.
func TestMultiDevice(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	kp := login(t, s, "bob", "phone")
	kl := login(t, s, "bob", "laptop")
	alice := dial(t, s, "alice", ka, false)
	phone := dial(t, s, "bob", kp, false)
	alice.sendJSON("x1", "bob", "to both")
	alice.expectServerAck("x1", wait)
	if m := phone.expect(wait); m.ID != "x1" {
		t.Fatalf("phone got %s", m.ID)
	}
	phone.ack("x1")
	laptop := dial(t, s, "bob", kl, true) // was offline: gets it on connect
	if m := laptop.expect(wait); m.ID != "x1" {
		t.Fatalf("laptop got %s", m.ID)
	}
}

// A second connection of the same device replaces the first.
func TestSameDeviceReplaces(t *testing.T) {
	s := startServer(t, t.TempDir())
	kb := login(t, s, "bob", "d1")
	first := dial(t, s, "bob", kb, false)
	_ = dial(t, s, "bob", kb, false)
	select {
	case code := <-first.closed:
		if code != 4002 {
			t.Fatalf("replaced socket closed with %d, want 4002", code)
		}
	case <-time.After(wait):
		t.Fatal("first socket not closed")
	}
}

// Logout revokes the key and closes that device's sockets.
func TestLogout(t *testing.T) {
	s := startServer(t, t.TempDir())
	kb := login(t, s, "bob", "d1")
	kb2 := login(t, s, "bob", "d2")
	c := dial(t, s, "bob", kb, false)
	if code := call(t, "POST", s.URL+"/logout", authHeaders("bob", kb), nil, nil); code != 200 {
		t.Fatalf("logout: %d", code)
	}
	select {
	case code := <-c.closed:
		if code != 4001 {
			t.Fatalf("socket closed with %d, want 4001", code)
		}
	case <-time.After(wait):
		t.Fatal("socket not closed on logout")
	}
	if code := call(t, "GET", s.URL+"/profile/", authHeaders("bob", kb), nil, nil); code != 401 {
		t.Fatalf("revoked key: %d, want 401", code)
	}
	if code := call(t, "GET", s.URL+"/profile/", authHeaders("bob", kb2), nil, nil); code != 200 {
		t.Fatalf("other device's key: %d, want 200", code)
	}
}

// Wrong or missing credentials get 401 with a JSON body, on HTTP and on the
// WebSocket upgrade; every route answers with and without /v1.0.
func TestAuthAndRoutes(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	login(t, s, "bob", "d1")

	var e struct {
		Status bool   `json:"status"`
		Error  string `json:"error"`
	}
	for _, h := range []map[string]string{nil, authHeaders("alice", "wrong"), authHeaders("bob", ka)} {
		if code := call(t, "GET", s.URL+"/profile/", h, nil, &e); code != 401 || e.Error == "" {
			t.Fatalf("headers %v: status %d body %+v", h, code, e)
		}
	}
	if _, err := tryDial(s, "alice", "wrong", false); err == nil {
		t.Fatal("websocket with a wrong key was accepted")
	}

	for _, prefix := range []string{"", "/v1.0"} {
		var p map[string]any
		for _, path := range []string{"/profile/", "/profile/get"} {
			if code := call(t, "GET", s.URL+prefix+path, authHeaders("alice", ka), nil, &p); code != 200 || p["username"] != "alice" {
				t.Fatalf("%s%s: %d %v", prefix, path, code, p)
			}
		}
		for _, path := range []string{"/contactbook/sync", "/profile/user/sync", "/profile/contactbook/sync"} {
			var m map[string]bool
			code := call(t, "POST", s.URL+prefix+path, authHeaders("alice", ka), map[string]any{"users": []string{"bob", "nobody", "bad.name"}}, &m)
			if code != 200 || !m["bob"] || len(m) != 1 {
				t.Fatalf("%s%s: %d %v", prefix, path, code, m)
			}
		}
		resp, err := http.Get(s.URL + prefix + "/alive")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s/alive: %v %v", prefix, err, resp)
		}
		resp.Body.Close()
	}
	resp, err := http.Get(s.URL + "/readyz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/readyz: %v %v", err, resp)
	}
	resp.Body.Close()

	// Bad login input: 400 naming the field; bad token: 401.
	if code := call(t, "POST", s.URL+"/login", nil, map[string]any{"username": "a.b", "authToken": "x"}, &e); code != 400 {
		t.Fatalf("bad username: %d", code)
	}
	if code := call(t, "POST", s.URL+"/login", nil, map[string]any{"username": "carol"}, &e); code != 401 {
		t.Fatalf("missing token: %d", code)
	}
}

// Bad frames get an error frame naming the message id; the socket stays up.
func TestBadFramesKeepSocket(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")
	alice := dial(t, s, "alice", ka, false)
	bob := dial(t, s, "bob", kb, false)
	cases := []struct{ frame, id, code string }{
		{`not json`, "", "malformed"},
		{`{"_v":2.1,"id":"e1","head":{"type":"INDIVIDUAL","contentType":"text"},"body":{}}`, "e1", "missing_to"},
		{`{"_v":2.1,"id":"e2","head":{"type":"INDIVIDUAL","to":"bob.*","contentType":"text"},"body":{}}`, "e2", "bad_to"},
		{`{"_v":2.1,"id":"e3","head":{"type":"WORMHOLE","to":"bob","contentType":"text"},"body":{}}`, "e3", "bad_channel"},
	}
	for _, tc := range cases {
		if err := alice.conn.WriteMessage(websocket.TextMessage, []byte(tc.frame)); err != nil {
			t.Fatal(err)
		}
		m := alice.expect(wait)
		if m.Action() != "error" || m.ID != tc.id {
			t.Fatalf("frame %q: got %+v", tc.frame, m)
		}
		var b struct {
			Code string `json:"code"`
		}
		if err := jsonUnmarshal(m.Content, &b); err != nil || b.Code != tc.code {
			t.Fatalf("frame %q: error body %s, want code %s", tc.frame, m.Content, tc.code)
		}
	}
	alice.sendJSON("ok1", "bob", "still here")
	alice.expectServerAck("ok1", wait)
	if m := bob.expect(wait); m.ID != "ok1" {
		t.Fatalf("bob got %s", m.ID)
	}
}

// POST /messages delivers, reports bad entries per entry and returns acks.
func TestRESTSend(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")
	good := func(id string) string {
		return fmt.Sprintf(`{"_v":2.1,"id":%q,"head":{"type":"INDIVIDUAL","to":"bob","contentType":"text"},"body":{"text":"via rest"}}`, id)
	}
	var resp struct {
		Acks   []string         `json:"acks"`
		Errors []map[string]any `json:"errors"`
	}
	code := call(t, "POST", s.URL+"/v1.0/messages?ack=true", authHeaders("alice", ka), []string{good("r1"), "garbage", good("r2")}, &resp)
	if code != 201 || len(resp.Acks) != 2 || len(resp.Errors) != 1 {
		t.Fatalf("POST /messages: %d %+v", code, resp)
	}
	bob := dial(t, s, "bob", kb, false)
	for _, id := range []string{"r1", "r2"} {
		if m := bob.expect(wait); m.ID != id || m.Source != "alice" {
			t.Fatalf("bob got %+v, want %s", m, id)
		}
	}
}

// A client that resends a message (it missed the SERVER_ACK) over WebSocket
// or HTTP gets an ack each time; the recipient gets the message once.
func TestResendDeliveredOnce(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")
	alice := dial(t, s, "alice", ka, false)
	bob := dial(t, s, "bob", kb, false)
	for range 3 {
		alice.sendJSON("once", "bob", "hello")
		alice.expectServerAck("once", wait)
	}
	body := `{"_v":2.1,"id":"once","head":{"type":"INDIVIDUAL","to":"bob","contentType":"text"},"body":{"text":"hello"}}`
	var resp struct {
		Acks []string `json:"acks"`
	}
	if code := call(t, "POST", s.URL+"/messages?ack=true", authHeaders("alice", ka), []string{body}, &resp); code != 201 || len(resp.Acks) != 1 {
		t.Fatalf("POST /messages: %d %+v", code, resp)
	}
	alice.sendJSON("next", "bob", "after")
	alice.expectServerAck("next", wait)
	if m := bob.expect(wait); m.ID != "once" {
		t.Fatalf("bob got %s, want once", m.ID)
	}
	if m := bob.expect(wait); m.ID != "next" {
		t.Fatalf("bob got %s, want next (the resends must not be delivered)", m.ID)
	}
}

// Large messages sent together fill gateway batches of up to 1 MiB, which
// CHAT_IN accepts and the router routes.
func TestLargeMessagesBatched(t *testing.T) {
	s := startServer(t, t.TempDir())
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")
	text := strings.Repeat("x", 60<<10)
	var entries []string
	for i := range 40 {
		entries = append(entries, fmt.Sprintf(`{"_v":2.1,"id":"big%d","head":{"type":"INDIVIDUAL","to":"bob","contentType":"text"},"body":{"text":%q}}`, i, text))
	}
	var resp struct {
		Acks   []string         `json:"acks"`
		Errors []map[string]any `json:"errors"`
	}
	if code := call(t, "POST", s.URL+"/messages?ack=true", authHeaders("alice", ka), entries, &resp); code != 201 || len(resp.Acks) != 40 || len(resp.Errors) != 0 {
		t.Fatalf("POST /messages: %d, %d acks, errors %v", code, len(resp.Acks), resp.Errors)
	}
	bob := dial(t, s, "bob", kb, false)
	for i := range 40 {
		if m := bob.expect(wait); m.ID != fmt.Sprintf("big%d", i) {
			t.Fatalf("bob got %s, want big%d", m.ID, i)
		}
	}
}

// Messages, keys and cursors survive a restart on the same data dir.
func TestRestartKeepsState(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir)
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")
	alice := dial(t, s, "alice", ka, false)
	for i := range 5 {
		alice.sendJSON(fmt.Sprintf("p%d", i), "bob", "persist")
		alice.expectServerAck(fmt.Sprintf("p%d", i), wait)
	}
	alice.Close()
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, dir)
	bob := dial(t, s, "bob", kb, false)
	for i := range 5 {
		if m := bob.expect(wait); m.ID != fmt.Sprintf("p%d", i) {
			t.Fatalf("after restart got %s", m.ID)
		}
	}
}

// Split mode: services in separate processes (here: separate run calls)
// against one external NATS server.
func TestSplitServices(t *testing.T) {
	ns := natstest.Start(t)
	url := ns.ClientURL()
	back := startServer(t, t.TempDir(), "--nats-url", url, "--services", "profile,delivery,router")
	edge := startServer(t, t.TempDir(), "--nats-url", url, "--services", "gateway")
	ka := login(t, back, "alice", "d1")
	kb := login(t, back, "bob", "d1")
	alice := dial(t, edge, "alice", ka, false)
	bob := dial(t, edge, "bob", kb, true)
	alice.sendJSON("s1", "bob", "split")
	alice.expectServerAck("s1", wait)
	if m := bob.expect(wait); m.ID != "s1" || m.Source != "alice" {
		t.Fatalf("bob got %+v", m)
	}
}

func TestServeFlagErrors(t *testing.T) {
	cases := []struct {
		name string
		args []string
	}{
		{"unknown service", []string{"serve", "--services", "nope"}},
		{"bad sync", []string{"serve", "--sync", "sometimes"}},
		{"firebase without project", []string{"serve", "--auth-provider", "firebase"}},
		{"dev auth on public addr", []string{"serve", "--http-addr", "0.0.0.0:0", "--data-dir", t.TempDir()}},
		{"bad metrics addr", []string{"serve", "--http-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:99999", "--data-dir", t.TempDir()}},
		{"negative device idle", []string{"serve", "--device-idle", "-1h"}},
		{"negative ws coalesce", []string{"serve", "--ws-coalesce", "-1ms"}},
		{"ws coalesce over a second", []string{"serve", "--ws-coalesce", "2s"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := run(t.Context(), tc.args, func(string) string { return "" }, &testlog.Buffer{}); err == nil {
				t.Fatal("expected an error")
			}
		})
	}
	// Environment variables configure flags; flags win.
	c, err := parseServe([]string{"--log-level", "warn"}, func(k string) string {
		return map[string]string{"VARTALAP_HTTP_ADDR": "127.0.0.1:9999", "VARTALAP_LOG_LEVEL": "debug",
			"VARTALAP_METRICS_ADDR": "127.0.0.1:9090", "VARTALAP_DEVICE_IDLE": "72h"}[k]
	}, &testlog.Buffer{})
	if err != nil || c.HTTPAddr != "127.0.0.1:9999" || c.LogLevel != "warn" || c.MetricsAddr != "127.0.0.1:9090" || c.DeviceIdle != 72*time.Hour {
		t.Fatalf("env/flag precedence: %+v %v", c, err)
	}
	// --ws-coalesce: 40ms by default, 0 turns coalescing off (negative in
	// the gateway's config, where 0 means its default).
	if c.WSCoalesce != 40*time.Millisecond || coalesce(c.WSCoalesce) != 40*time.Millisecond {
		t.Fatalf("default --ws-coalesce %v", c.WSCoalesce)
	}
	if c, err := parseServe([]string{"--ws-coalesce", "0"}, func(string) string { return "" }, &testlog.Buffer{}); err != nil || coalesce(c.WSCoalesce) >= 0 {
		t.Fatalf("--ws-coalesce 0: %v, %v", c, err)
	}
}

// `vartalap health` succeeds against a ready server and fails without one.
func TestHealthCommand(t *testing.T) {
	s := startServer(t, t.TempDir())
	var out testlog.Buffer
	if err := run(t.Context(), []string{"health", "--url", s.URL}, func(string) string { return "" }, &out); err != nil {
		t.Fatalf("health of a running server: %v", err)
	}
	// The address from VARTALAP_HTTP_ADDR, as in the container image.
	addr := strings.TrimPrefix(s.URL, "http://")
	env := func(k string) string {
		if k == "VARTALAP_HTTP_ADDR" {
			return addr
		}
		return ""
	}
	if err := run(t.Context(), []string{"health"}, env, &out); err != nil {
		t.Fatalf("health from VARTALAP_HTTP_ADDR: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := run(t.Context(), []string{"health", "--url", s.URL, "--timeout", "2s"}, func(string) string { return "" }, &out); err == nil {
		t.Fatal("health of a stopped server succeeded")
	}
}
