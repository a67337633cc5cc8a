package fcm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vartalap/vartalap/push"
)

const project = "demo-vartalap"

const sendPath = "/v1/projects/" + project + "/messages:send"

// elsewhere records any request that leaves for a host other than the fake
// FCM: TestMain makes it the HTTP(S) proxy (the SDK's transport honours the
// proxy environment for every non-loopback host) and the GCE metadata host.
var elsewhere struct {
	mu   sync.Mutex
	hits []string
}

func TestMain(m *testing.M) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.mu.Lock()
		elsewhere.hits = append(elsewhere.hits, r.Method+" "+r.Host+r.URL.Path)
		elsewhere.mu.Unlock()
		http.Error(w, "no network in tests", http.StatusForbidden)
	}))
	for k, v := range map[string]string{
		"HTTP_PROXY":        srv.URL,
		"HTTPS_PROXY":       srv.URL,
		"http_proxy":        srv.URL,
		"https_proxy":       srv.URL,
		"NO_PROXY":          "",
		"no_proxy":          "",
		"GCE_METADATA_HOST": strings.TrimPrefix(srv.URL, "http://"),
	} {
		os.Setenv(k, v)
	}
	for _, k := range []string{"GOOGLE_APPLICATION_CREDENTIALS", "FIREBASE_CONFIG", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"} {
		os.Unsetenv(k)
	}
	code := m.Run()
	srv.Close()
	os.Exit(code)
}

// checkNoElsewhere fails t if anything but the fake FCM was contacted.
func checkNoElsewhere(t *testing.T) {
	t.Helper()
	elsewhere.mu.Lock()
	defer elsewhere.mu.Unlock()
	if len(elsewhere.hits) > 0 {
		t.Fatalf("requests left for other hosts: %v", elsewhere.hits)
	}
}

// reply is one scripted response of the fake FCM.
type reply struct {
	status  int
	body    string
	headers map[string]string
}

var okReply = reply{status: http.StatusOK, body: `{"name":"projects/` + project + `/messages/0:1"}`}

func fcmError(status int, grpcStatus, errorCode string) reply {
	return reply{status: status, body: fmt.Sprintf(`{"error":{"code":%d,"status":%q,"message":"fake error","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":%q}]}}`, status, grpcStatus, errorCode)}
}

// request is one request the fake FCM received.
type request struct {
	method, path, auth string
	body               []byte
}

// fakeFCM speaks the FCM v1 send API: it answers the scripted replies in
// order (then 200) and records every request.
type fakeFCM struct {
	*httptest.Server
	mu      sync.Mutex
	replies []reply
	got     []request
}

func newFake(t *testing.T, replies ...reply) *fakeFCM {
	f := &fakeFCM{replies: replies}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		f.got = append(f.got, request{r.Method, r.URL.Path, r.Header.Get("Authorization"), body})
		rep := okReply
		if len(f.replies) > 0 {
			rep, f.replies = f.replies[0], f.replies[1:]
		}
		f.mu.Unlock()
		for k, v := range rep.headers {
			w.Header().Set(k, v)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(rep.status)
		io.WriteString(w, rep.body)
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeFCM) requests() []request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.got)
}

// checkOnlySends fails t unless every request was an unauthenticated POST
// to the send path.
func (f *fakeFCM) checkOnlySends(t *testing.T) {
	t.Helper()
	for _, r := range f.requests() {
		if r.method != http.MethodPost || r.path != sendPath || r.auth != "" {
			t.Errorf("unexpected request %s %s (authorization %q)", r.method, r.path, r.auth)
		}
	}
}

func newSender(t *testing.T, f *fakeFCM) *Sender {
	t.Helper()
	s, err := New(context.Background(), project, "", f.URL)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

func TestPayload(t *testing.T) {
	tests := []struct {
		name    string
		n       push.Notification
		wantTTL string
	}{
		{"default ttl with count", push.Notification{
			Token:       "tok-1",
			Data:        map[string]string{push.DataMessage: `{"_v":2.1,"id":"m1"}`, push.DataCount: "3"},
			CollapseKey: "alice",
			TTL:         24 * time.Hour,
		}, "86400s"},
		{"hour and a half", push.Notification{
			Token:       "tok-2",
			Data:        map[string]string{push.DataMessage: `{}`},
			CollapseKey: "team1",
			TTL:         90*time.Minute + 300*time.Millisecond,
		}, "5400s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t)
			if err := newSender(t, f).Send(context.Background(), tt.n); err != nil {
				t.Fatalf("Send: %v", err)
			}
			reqs := f.requests()
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			f.checkOnlySends(t)
			var body struct {
				Message map[string]json.RawMessage `json:"message"`
			}
			if err := json.Unmarshal(reqs[0].body, &body); err != nil {
				t.Fatalf("body %s: %v", reqs[0].body, err)
			}
			var token string
			var data map[string]string
			var android map[string]any
			json.Unmarshal(body.Message["token"], &token)
			json.Unmarshal(body.Message["data"], &data)
			json.Unmarshal(body.Message["android"], &android)
			if token != tt.n.Token {
				t.Errorf("token %q, want %q", token, tt.n.Token)
			}
			if !mapsEqual(data, tt.n.Data) {
				t.Errorf("data %v, want %v", data, tt.n.Data)
			}
			want := map[string]any{"priority": "high", "ttl": tt.wantTTL, "collapse_key": tt.n.CollapseKey}
			if fmt.Sprint(android) != fmt.Sprint(want) {
				t.Errorf("android %v, want %v", android, want)
			}
			for k := range body.Message {
				if k != "token" && k != "data" && k != "android" {
					t.Errorf("unexpected message field %q in %s", k, reqs[0].body)
				}
			}
			checkNoElsewhere(t)
		})
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// outcome is the expected class of one Send's error.
type outcome struct {
	token     bool          // wraps push.ErrTokenInvalid
	retryable bool          // is a *push.RetryableError
	after     time.Duration // its After
	fail      bool          // any other error
}

func TestErrors(t *testing.T) {
	tooMany := reply{status: http.StatusTooManyRequests, headers: map[string]string{"Retry-After": "7"},
		body: `{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"QUOTA_EXCEEDED"}]}}`}
	badToken := reply{status: http.StatusBadRequest,
		body: `{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"The registration token is not a valid FCM registration token","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}`}
	badPayload := reply{status: http.StatusBadRequest,
		body: `{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"Message is too big","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.data","description":"too big"}]}]}}`}
	tests := []struct {
		name     string
		replies  []reply
		want     []outcome // one per Send
		requests int       // requests the fake gets in total
	}{
		{"unregistered", []reply{fcmError(404, "NOT_FOUND", "UNREGISTERED")}, []outcome{{token: true}}, 1},
		{"sender id mismatch", []reply{fcmError(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")}, []outcome{{token: true}}, 1},
		{"invalid token argument", []reply{badToken}, []outcome{{token: true}}, 1},
		{"invalid payload is permanent", []reply{badPayload}, []outcome{{fail: true}}, 1},
		{"unauthenticated is permanent", []reply{fcmError(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")}, []outcome{{fail: true}}, 1},
		{"429 with retry-after then success", []reply{tooMany, okReply}, []outcome{{retryable: true, after: 7 * time.Second}, {}}, 2},
		{"500 is retryable", []reply{fcmError(500, "INTERNAL", "INTERNAL")}, []outcome{{retryable: true}}, 1},
		// The SDK retries a 503 itself, immediately the first time.
		{"503 once is absorbed by the sdk", []reply{fcmError(503, "UNAVAILABLE", "UNAVAILABLE"), okReply}, []outcome{{}}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, tt.replies...)
			s := newSender(t, f)
			for i, want := range tt.want {
				err := s.Send(context.Background(), push.Notification{Token: "tok", Data: map[string]string{push.DataMessage: "{}"}, TTL: time.Hour})
				var re *push.RetryableError
				isRetry := errors.As(err, &re)
				got := outcome{token: errors.Is(err, push.ErrTokenInvalid), retryable: isRetry}
				if isRetry {
					got.after = re.After
				}
				got.fail = err != nil && !got.token && !got.retryable
				if got != want {
					t.Errorf("send %d: err %v, got %+v, want %+v", i, err, got, want)
				}
			}
			if got := len(f.requests()); got != tt.requests {
				t.Errorf("fake got %d requests, want %d", got, tt.requests)
			}
			f.checkOnlySends(t)
			checkNoElsewhere(t)
		})
	}
}

func TestNewNeedsProjectOrCredentials(t *testing.T) {
	tests := []struct {
		name, project, creds, endpoint string
	}{
		{"endpoint without project", "", "", "http://127.0.0.1:1"},
		{"no credentials anywhere", project, "", ""},
		{"missing credentials file", project, t.TempDir() + "/none.json", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(context.Background(), tt.project, tt.creds, tt.endpoint); err == nil {
				t.Fatal("New succeeded")
			}
			checkNoElsewhere(t)
		})
	}
}

func TestSendCanceled(t *testing.T) {
	f := newFake(t)
	s := newSender(t, f)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := s.Send(ctx, push.Notification{Token: "tok", Data: map[string]string{push.DataMessage: "{}"}})
	var re *push.RetryableError
	if !errors.Is(err, context.Canceled) || errors.As(err, &re) {
		t.Fatalf("Send on canceled ctx: %v", err)
	}
	checkNoElsewhere(t)
}

// TestElsewhereDetects proves the harness: a request the SDK sends to a
// non-loopback host is caught by the recording proxy (and never leaves).
func TestElsewhereDetects(t *testing.T) {
	s, err := New(context.Background(), project, "", "http://fcm.example.invalid")
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	err = s.Send(context.Background(), push.Notification{Token: "tok", Data: map[string]string{push.DataMessage: "{}"}})
	if err == nil {
		t.Fatal("Send through the recording proxy succeeded")
	}
	elsewhere.mu.Lock()
	hits := elsewhere.hits
	elsewhere.hits = nil
	elsewhere.mu.Unlock()
	want := "POST fcm.example.invalid" + sendPath
	if !slices.Contains(hits, want) {
		t.Fatalf("recorded %v, want %q", hits, want)
	}
}
