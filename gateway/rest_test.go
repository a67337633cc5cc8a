package gateway

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vartalap/vartalap/schema"
)

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// jsonString quotes s as a JSON string.
func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func jsonArray(entries ...string) string {
	q := make([]string, len(entries))
	for i, s := range entries {
		q[i] = jsonString(s)
	}
	return "[" + strings.Join(q, ",") + "]"
}

func (e *env) post(t testing.TB, path string, h http.Header, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, e.srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("post: %v", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("content type %q", ct)
	}
	return resp.StatusCode, data
}

func TestRESTMessages(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.MaxRESTMessages = 5 }))
	alice := credHeader("alice", "ka")
	b64 := func(m *schema.Message) string { return base64.StdEncoding.EncodeToString(m.MarshalProto()) }
	protoMsg := func(id string) *schema.Message {
		return &schema.Message{Version: 2.1, ID: id, Type: schema.TypeMessage, Channel: schema.ChannelIndividual,
			Source: "mallory", Destination: "bob", Content: []byte(`{"text":"hi"}`)}
	}
	cases := []struct {
		name       string
		path       string
		header     http.Header
		body       string
		wantStatus int
		wantAcks   []string // ids of the SERVER_ACKs, in order; nil = no "acks" key
		wantErrors []restError
		wantError  string // top-level "error" when everything failed
		wantStored int    // new CHAT_IN messages
	}{
		{
			name: "one bad entry of three", path: "/messages?ack=true", header: alice,
			body:       jsonArray(chatJSON("r1", "bob"), `{"_v":2.1,"id":"r2","head":{"type":"INDIVIDUAL"},"body":{}}`, chatJSON("r3", "bob")),
			wantStatus: http.StatusCreated, wantAcks: []string{"r1", "r3"},
			wantErrors: []restError{{Index: 1, ID: "r2", Code: schema.CodeMissingTo}}, wantStored: 2,
		},
		{
			name: "all bad", path: "/messages?ack=true", header: alice,
			body:       jsonArray("not json", chatJSON("r4", "bob.>")),
			wantStatus: http.StatusBadRequest, wantError: schema.CodeMalformed,
			wantErrors: []restError{{Index: 0, Code: schema.CodeMalformed}, {Index: 1, ID: "r4", Code: schema.CodeBadTo}},
		},
		{
			name: "ack=false gives no acks", path: "/messages?ack=false", header: alice,
			body: jsonArray(chatJSON("r5", "bob")), wantStatus: http.StatusCreated, wantStored: 1,
		},
		{
			name: "no ack parameter", path: "/messages", header: alice,
			body: jsonArray(chatJSON("r6", "bob")), wantStatus: http.StatusCreated, wantStored: 1,
		},
		{
			name: "ack=1", path: "/v1.0/messages?ack=1", header: alice,
			body: jsonArray(chatJSON("r7", "bob")), wantStatus: http.StatusCreated, wantAcks: []string{"r7"}, wantStored: 1,
		},
		{
			name: "binary", path: "/messages?format=binary&ack=true", header: alice,
			body:       jsonArray(b64(protoMsg("r8")), strings.TrimRight(base64.URLEncoding.EncodeToString(protoMsg("r9").MarshalProto()), "="), "%%%"),
			wantStatus: http.StatusCreated, wantAcks: []string{"r8", "r9"},
			wantErrors: []restError{{Index: 2, Code: schema.CodeMalformed}}, wantStored: 2,
		},
		{
			// Stored again; the router stores one copy (see router tests).
			name: "resend is acked", path: "/messages?ack=true", header: alice,
			body: jsonArray(chatJSON("r1", "bob")), wantStatus: http.StatusCreated, wantAcks: []string{"r1"}, wantStored: 1,
		},
		{
			name: "client acks only", path: "/messages?ack=true", header: alice,
			body:       jsonArray(`{"_v":2.1,"id":"c1","head":{"contentType":"CLIENT_ACK","to":"server"},"body":{}}`, `{"_v":2.1,"id":"c2","head":{"contentType":"client_ack"}}`),
			wantStatus: http.StatusCreated, wantAcks: []string{},
		},
		{
			name: "oversized entry", path: "/messages", header: alice,
			body:       jsonArray(chatJSON("r10", "bob"), `{"_v":2.1,"id":"big","head":{"to":"bob"},"body":{"t":"`+strings.Repeat("z", 70<<10)+`"}}`),
			wantStatus: http.StatusCreated, wantErrors: []restError{{Index: 1, Code: schema.CodeTooLarge}}, wantStored: 1,
		},
		{name: "not an array", path: "/messages", header: alice, body: `{"id":"x"}`, wantStatus: http.StatusBadRequest, wantError: "bad_request"},
		{name: "array of numbers", path: "/messages", header: alice, body: `[1,2]`, wantStatus: http.StatusBadRequest, wantError: "bad_request"},
		{name: "empty array", path: "/messages", header: alice, body: `[]`, wantStatus: http.StatusBadRequest, wantError: "bad_request"},
		{name: "too many entries", path: "/messages", header: alice, body: jsonArray("1", "2", "3", "4", "5", "6"), wantStatus: http.StatusRequestEntityTooLarge, wantError: "too_large"},
		{name: "unauthenticated", path: "/messages", header: credHeader("alice", "wrong"), body: jsonArray(chatJSON("r11", "bob")), wantStatus: http.StatusUnauthorized, wantError: "unauthenticated"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.streamMsgs(t)
			status, body := e.post(t, tc.path, tc.header, tc.body)
			if status != tc.wantStatus {
				t.Fatalf("status %d, want %d: %s", status, tc.wantStatus, body)
			}
			var raw map[string]json.RawMessage
			if err := json.Unmarshal(body, &raw); err != nil {
				t.Fatalf("body is not a JSON object: %s", body)
			}
			var resp restResponse
			if err := json.Unmarshal(body, &resp); err != nil {
				t.Fatal(err)
			}
			if tc.wantError != "" {
				if resp.Status == nil || *resp.Status || resp.Error != tc.wantError {
					t.Fatalf("want status false, error %q: %s", tc.wantError, body)
				}
			} else if _, ok := raw["status"]; ok {
				t.Fatalf("success body has status: %s", body)
			}
			if _, hasAcks := raw["acks"]; hasAcks != (tc.wantAcks != nil) {
				t.Fatalf("acks present = %v, want %v: %s", hasAcks, tc.wantAcks != nil, body)
			}
			var ackIDs []string
			for _, a := range resp.Acks {
				var m *schema.Message
				if strings.Contains(tc.path, "format=binary") {
					data, err := base64.StdEncoding.DecodeString(a)
					if err != nil {
						t.Fatalf("binary ack is not base64: %v", err)
					}
					if m, err = schema.UnmarshalProto(data); err != nil {
						t.Fatalf("binary ack: %v", err)
					}
					if m.Type != schema.TypeServerAck || m.ServerID == "" {
						t.Fatalf("binary ack %+v", m)
					}
				} else {
					m = parseAck(t, 1, []byte(a))
				}
				if m.Destination != "alice" || m.Source != schema.ServerSource {
					t.Fatalf("ack %+v", m)
				}
				ackIDs = append(ackIDs, m.ID)
			}
			if len(ackIDs) != len(tc.wantAcks) || (len(ackIDs) > 0 && !reflect.DeepEqual(ackIDs, tc.wantAcks)) {
				t.Fatalf("acks for %v, want %v", ackIDs, tc.wantAcks)
			}
			for i := range resp.Errors {
				if resp.Errors[i].Reason == "" {
					t.Fatalf("error without reason: %s", body)
				}
				resp.Errors[i].Reason = ""
			}
			if !reflect.DeepEqual(resp.Errors, tc.wantErrors) {
				t.Fatalf("errors %+v, want %+v", resp.Errors, tc.wantErrors)
			}
			if got := e.streamMsgs(t) - before; got != uint64(tc.wantStored) {
				t.Fatalf("%d new CHAT_IN messages, want %d", got, tc.wantStored)
			}
			if tc.wantStored > 0 {
				if _, m := e.lastStored(t); m.Source != "alice" {
					t.Fatalf("stored source %q, want alice", m.Source)
				}
			}
		})
	}
	e.del.mu.Lock()
	defer e.del.mu.Unlock()
	want := []restAck{{user: "alice", device: "phone", ids: []string{"c1", "c2"}}}
	if !reflect.DeepEqual(e.del.restAcks, want) {
		t.Fatalf("REST acks %+v, want %+v", e.del.restAcks, want)
	}
}
