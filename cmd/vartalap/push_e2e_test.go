package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeFCM speaks the FCM v1 messages:send API and records what it got.
type fakeFCM struct {
	mu   sync.Mutex
	reqs []fcmRequest
	srv  *httptest.Server
}

type fcmRequest struct {
	Path    string
	Message struct {
		Token   string            `json:"token"`
		Data    map[string]string `json:"data"`
		Android struct {
			Priority    string `json:"priority"`
			TTL         string `json:"ttl"`
			CollapseKey string `json:"collapse_key"`
		} `json:"android"`
	} `json:"message"`
}

func newFakeFCM(t *testing.T) *fakeFCM {
	f := &fakeFCM{}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var req fcmRequest
		_ = json.Unmarshal(body, &req)
		req.Path = r.URL.Path
		f.mu.Lock()
		f.reqs = append(f.reqs, req)
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"name":"projects/demo/messages/1"}`)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeFCM) requests() []fcmRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fcmRequest(nil), f.reqs...)
}

// Through run with --push-provider fcm --fcm-endpoint: an offline device is
// pushed through the real Firebase SDK; an online one is not.
func TestPushEndToEnd(t *testing.T) {
	fcm := newFakeFCM(t)
	s := startServer(t, t.TempDir(), "--push-provider", "fcm", "--fcm-endpoint", fcm.srv.URL, "--firebase-project", "demo")
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1") // notificationToken tok-bob-d1
	alice := dial(t, s, "alice", ka, false)

	alice.sendJSON("p1", "bob", "are you there")
	alice.expectServerAck("p1", wait)
	deadline := time.Now().Add(wait)
	for len(fcm.requests()) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	reqs := fcm.requests()
	if len(reqs) != 1 {
		t.Fatalf("fake FCM got %d pushes, want 1", len(reqs))
	}
	r := reqs[0]
	if r.Path != "/v1/projects/demo/messages:send" || r.Message.Token != "tok-bob-d1" || r.Message.Android.Priority != "high" ||
		r.Message.Android.TTL != "86400s" || !strings.Contains(r.Message.Data["message"], `"text":"are you there"`) {
		t.Fatalf("push: %+v", r)
	}

	// Bob online: he gets the message on the socket and no push is sent.
	bob := dial(t, s, "bob", kb, false)
	if m := bob.expect(wait); m.ID != "p1" {
		t.Fatalf("bob got %s", m.ID)
	}
	bob.ack("p1")
	time.Sleep(2500 * time.Millisecond) // beyond the coalescing window
	alice.sendJSON("p2", "bob", "now you are")
	alice.expectServerAck("p2", wait)
	if m := bob.expect(wait); m.ID != "p2" {
		t.Fatalf("bob got %s", m.ID)
	}
	time.Sleep(500 * time.Millisecond)
	if n := len(fcm.requests()); n != 1 {
		t.Fatalf("fake FCM got %d pushes, want still 1", n)
	}
}
