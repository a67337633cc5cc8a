package schema

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// decodeStamped decodes a client JSON frame and stamps it as the gateway does.
func decodeStamped(t testing.TB, in string, user UserID, serverID string, nowMs uint64) *Message {
	t.Helper()
	m, err := DecodeJSON([]byte(in))
	if err != nil {
		t.Fatalf("DecodeJSON(%s): %v", in, err)
	}
	if err := m.Validate(); err != nil {
		t.Fatalf("Validate(%s): %v", in, err)
	}
	m.Stamp(user, serverID, nowMs)
	return m
}

// groupEvent builds a group event as §7.2.1 describes it.
func groupEvent(sid, actor, group, action, body string, nowMs uint64) *Message {
	return &Message{
		Version: 3.0, ID: sid, Type: TypeNotification, Channel: ChannelIndividual,
		Source: actor, Destination: group, Content: []byte(body), Timestamp: nowMs,
		Meta:     map[string]string{"chatId": group, "chatid": group, "contentType": "notification", "action": action},
		ServerID: sid, ServerTimestamp: nowMs,
	}
}

// sameJSON reports whether a and b are equal JSON values, ignoring key order.
func sameJSON(t *testing.T, a, b string) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal([]byte(a), &va); err != nil {
		t.Fatalf("invalid JSON %s: %v", a, err)
	}
	if err := json.Unmarshal([]byte(b), &vb); err != nil {
		t.Fatalf("invalid JSON %s: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

// TestRenderSeedVerified compares with the seed outputs marked [verified]
// in seed-spec.md. want is the seed's string with only the meta keys put in
// sorted order (the seed wrote them in insertion order); seed is the string
// as the spec gives it, which must be the same JSON value.
func TestRenderSeedVerified(t *testing.T) {
	const ts = 0 // serverTimestamp 0: omitted, like the seed
	tests := []struct {
		name string
		m    *Message
		want string
		seed string
	}{
		{
			name: "§3.4 chat message",
			m:    decodeStamped(t, `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","to":"bob","from":"alice","chatid":"c1","contentType":"text","action":"message"},"meta":{"createdAt":123},"body":{"text":"hi"}}`, "alice", "", ts),
			want: `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","from":"alice","to":"bob","contentType":"text","ephemeral":false,"action":"message","chatid":"c1","category":"message"},"body":{"text":"hi"},"from":"alice","to":"bob","msgId":"m1","type":"text","text":"hi","module":"INDIVIDUAL","action":"message","chatType":"INDIVIDUAL"}`,
			seed: `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","from":"alice","to":"bob","contentType":"text","ephemeral":false,"chatid":"c1","action":"message","category":"message"},"body":{"text":"hi"},"from":"alice","to":"bob","msgId":"m1","type":"text","text":"hi","module":"INDIVIDUAL","action":"message","chatType":"INDIVIDUAL"}`,
		},
		{
			name: "§3.7 server ack",
			m:    ServerAck(decodeStamped(t, `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","to":"bob","contentType":"text"},"body":{"text":"hi"}}`, "alice", "sid", ts)),
			want: `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","from":"server","to":"alice","contentType":"SERVER_ACK","ephemeral":true,"category":"message"},"body":{},"from":"server","to":"alice","msgId":"m1","type":"SERVER_ACK","module":"INDIVIDUAL","chatType":"INDIVIDUAL"}`,
			seed: `{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","from":"server","to":"alice","contentType":"SERVER_ACK","ephemeral":true,"category":"message"},"body":{},"from":"server","to":"alice","msgId":"m1","type":"SERVER_ACK","module":"INDIVIDUAL","chatType":"INDIVIDUAL"}`,
		},
		{
			name: "§7.2.1 group event",
			m:    groupEvent("sid1", "alice", "g1", "add", `{"added":[{"username":"alice","role":"admin"}]}`, ts),
			want: `{"_v":2.1,"id":"sid1","head":{"type":"INDIVIDUAL","from":"alice","to":"g1","contentType":"notification","ephemeral":false,"action":"add","chatId":"g1","chatid":"g1","category":"message"},"body":{"added":[{"username":"alice","role":"admin"}]},"from":"alice","to":"g1","msgId":"sid1","type":"notification","chatId":"g1","module":"INDIVIDUAL","action":"add","chatType":"INDIVIDUAL"}`,
			seed: `{"_v":2.1,"id":"sid1","head":{"type":"INDIVIDUAL","from":"alice","to":"g1","contentType":"notification","ephemeral":false,"chatId":"g1","chatid":"g1","action":"add","category":"message"},"body":{"added":[{"username":"alice","role":"admin"}]},"from":"alice","to":"g1","msgId":"sid1","type":"notification","chatId":"g1","module":"INDIVIDUAL","action":"add","chatType":"INDIVIDUAL"}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := string(RenderJSON(tt.m))
			if got != tt.want {
				t.Fatalf("RenderJSON =\n%s\nwant\n%s", got, tt.want)
			}
			if !sameJSON(t, got, tt.seed) {
				t.Fatalf("not the seed's JSON value:\n%s\n%s", got, tt.seed)
			}
		})
	}
}

// goldenCases are every message shape a client sees. Each is pinned as
// rendered JSON (testdata/<name>.json) and as protobuf (testdata/<name>.pb.hex).
func goldenCases(t testing.TB) []struct {
	name string
	m    *Message
} {
	const now = 1700000000000
	chat := decodeStamped(t, `{"_v":2.1,"id":"alice1","head":{"type":"INDIVIDUAL","to":"bob","from":"mallory","chatid":"alice","contentType":"text","action":"message","ephemeral":false},"meta":{"hash":"md5:x"},"body":{"text":"hi \"bob\" ✓ <3","ts":1700000000}}`, "alice", "sid-chat", now)
	return []struct {
		name string
		m    *Message
	}{
		{"v21_chat", chat},
		{"v20_group_chat", decodeStamped(t, `{"_v":2.0,"id":"alice2","head":{"type":"GROUP","to":"g1","chatid":"g1","contentType":"text","action":"message"},"body":{"text":"hello group"}}`, "alice", "sid-v20", now)},
		{"v1_with_state", decodeStamped(t, `{"msgId":"alice3","from":"alice","to":"bob","chatId":"alice","text":"hi","type":"text","chatType":"INDIVIDUAL","action":"message","state":"new"}`, "alice", "sid-v1a", now)},
		{"v1_without_state", decodeStamped(t, `{"msgId":"alice4","to":"bob","text":"hi","type":"text","module":"chat"}`, "alice", "sid-v1b", now)},
		{"string_body", decodeStamped(t, `{"_v":2.1,"id":"alice5","head":{"type":"chat","to":"bob","contentType":"text"},"body":"just a string"}`, "alice", "sid-str", now)},
		{"binary_content", &Message{Version: 2.1, ID: "alice6", Type: TypeMessage, Channel: ChannelIndividual, Source: "alice", Destination: "bob",
			Content: []byte{0x89, 'P', 'N', 'G', 0, 0xff}, Timestamp: 1700000000, Meta: map[string]string{"contentType": "image"}, ServerID: "sid-bin", ServerTimestamp: now}},
		{"server_ack", ServerAck(chat)},
		{"error_notice", ErrorNotice("alice", "alice7", CodeBadTo, "destination is not a valid user id", now)},
		{"group_event", groupEvent("sid-grp", "alice", "g1", "add", `{"added":[{"username":"alice","role":"admin"},{"username":"bob","role":"user"}]}`, now)},
		{"group_event_remove", groupEvent("sid-grp2", "alice", "g1", "remove", `{"removed":["bob"]}`, now)},
		{"read_receipt", decodeStamped(t, `{"_v":2.1,"id":"bob1","head":{"type":"INDIVIDUAL","to":"alice","contentType":"notification","action":"state","ephemeral":"false"},"body":{"ids":["alice1"],"state":"read"}}`, "bob", "sid-rcpt", now)},
		{"client_ack", decodeStamped(t, `{"_v":2.1,"id":"alice1","head":{"type":"INDIVIDUAL","to":"server","contentType":"CLIENT_ACK","ephemeral":true},"body":{}}`, "bob", "sid-cack", now)},
	}
}

func TestGolden(t *testing.T) {
	for _, tc := range goldenCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			js := RenderJSON(tc.m)
			if !json.Valid(js) {
				t.Fatalf("invalid JSON: %s", js)
			}
			pb := []byte(hex.EncodeToString(tc.m.MarshalProto()) + "\n")
			checkGolden(t, tc.name+".json", append(js, '\n'))
			checkGolden(t, tc.name+".pb.hex", pb)

			back, err := UnmarshalProto(tc.m.MarshalProto())
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(back, tc.m) {
				t.Fatalf("protobuf round trip:\n got  %#v\n want %#v", back, tc.m)
			}
		})
	}
}

func checkGolden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s differs (go test -update rewrites it):\n got  %s\n want %s", path, got, want)
	}
}

// TestRenderJSONFields checks the rules of the shape one at a time.
func TestRenderJSONFields(t *testing.T) {
	tests := []struct {
		name string
		m    *Message
		want map[string]any // top-level or "head.<key>" values; nil value = key absent
	}{
		{
			name: "empty message",
			m:    &Message{},
			want: map[string]any{"_v": 2.1, "id": "", "msgId": "", "from": nil, "to": nil, "head.from": nil, "head.to": nil,
				"head.type": "UNKNOWN", "head.contentType": "SERVER_ACK", "head.ephemeral": false, "body": map[string]any{}, "text": nil, "serverTimestamp": nil},
		},
		{
			name: "server timestamp added",
			m:    &Message{ID: "m", ServerTimestamp: 1700000000001, Timestamp: 5, ServerID: "s"},
			want: map[string]any{"serverTimestamp": 1700000000001.0, "timestamp": nil, "serverId": nil},
		},
		{
			name: "string body is its own text",
			m:    &Message{Content: []byte(`"hey"`)},
			want: map[string]any{"body": "hey", "text": "hey"},
		},
		{
			name: "number body",
			m:    &Message{Content: []byte(`42`)},
			want: map[string]any{"body": 42.0, "text": "[unknown]"},
		},
		{
			name: "array body has no text",
			m:    &Message{Content: []byte(`[1,"text"]`)},
			want: map[string]any{"body": []any{1.0, "text"}, "text": nil},
		},
		{
			name: "null body renders as empty object",
			m:    &Message{Content: []byte(`null`)},
			want: map[string]any{"body": map[string]any{}, "text": nil},
		},
		{
			name: "non-string text is copied",
			m:    &Message{Content: []byte(`{"a":{"text":"inner"},"text":{"x":[1]}}`)},
			want: map[string]any{"text": map[string]any{"x": []any{1.0}}},
		},
		{
			name: "escaped text key, last duplicate wins",
			m:    &Message{Content: []byte(`{"text":"first","t\u0065xt":"second","texts":"no"}`)},
			want: map[string]any{"text": "second"},
		},
		{
			name: "text key is case-sensitive",
			m:    &Message{Content: []byte(`{"Text":"x"}`)},
			want: map[string]any{"text": nil},
		},
		{
			name: "whitespace in protobuf content is compacted",
			m:    &Message{Content: []byte(" { \"text\" : \"a b\" } ")},
			want: map[string]any{"text": "a b"},
		},
		{
			name: "binary content",
			m:    &Message{Content: []byte{0xff, 0x00}},
			want: map[string]any{"body": map[string]any{"base64": "/wA="}, "text": "[unknown]"},
		},
		{
			name: "valid JSON with invalid utf-8 is binary",
			m:    &Message{Content: []byte("\"\xff\"")},
			want: map[string]any{"body": map[string]any{"base64": "Iv8i"}, "text": "[unknown]"},
		},
		{
			name: "meta cannot shadow head fields; _m keys hidden",
			m: &Message{Source: "alice", Destination: "bob", Channel: ChannelGroup, Meta: map[string]string{
				"from": "mallory", "to": "eve", "type": "X", "ephemeral": "true", "_mid": "secret", "_m": "x", "m_ok": "yes"}},
			want: map[string]any{"head.from": "alice", "head.to": "bob", "head.type": "GROUP", "head.ephemeral": false,
				"head._mid": nil, "head._m": nil, "head.m_ok": "yes"},
		},
		{
			name: "contentType meta overrides type name",
			m:    &Message{Type: TypeClientAck, Meta: map[string]string{"contentType": ""}},
			want: map[string]any{"head.contentType": "", "type": ""},
		},
		{
			name: "category from meta",
			m:    &Message{Meta: map[string]string{"category": "user", "action": "ack"}},
			want: map[string]any{"head.category": "user", "action": "ack"},
		},
		{
			name: "empty category meta is replaced",
			m:    &Message{Meta: map[string]string{"category": "", "action": "state"}},
			want: map[string]any{"head.category": "system"},
		},
		{
			name: "ack action is system",
			m:    &Message{Meta: map[string]string{"action": "ack"}},
			want: map[string]any{"head.category": "system"},
		},
		{
			name: "chatid (lower case) is not copied to top level",
			m:    &Message{Meta: map[string]string{"chatid": "c"}},
			want: map[string]any{"chatId": nil, "head.chatid": "c", "action": nil},
		},
		{
			name: "unknown enum values",
			m:    &Message{Type: 99, Channel: 99},
			want: map[string]any{"head.type": "UNKNOWN", "head.contentType": "UNKNOWN_TYPE", "module": "UNKNOWN", "chatType": "UNKNOWN"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := RenderJSON(tt.m)
			var top map[string]any
			if err := json.Unmarshal(out, &top); err != nil {
				t.Fatalf("invalid JSON %s: %v", out, err)
			}
			head, _ := top["head"].(map[string]any)
			for k, want := range tt.want {
				obj, key := top, k
				if rest, ok := strings.CutPrefix(k, "head."); ok {
					obj, key = head, rest
				}
				got, present := obj[key]
				if want == nil {
					if present {
						t.Errorf("%s = %v, want absent", k, got)
					}
					continue
				}
				if !present || !reflect.DeepEqual(got, want) {
					t.Errorf("%s = %#v (present %v), want %#v", k, got, present, want)
				}
			}
			if t.Failed() {
				t.Logf("output: %s", out)
			}
		})
	}
}

func TestAppendJSONString(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"plain", "abc", `"abc"`},
		{"empty", "", `""`},
		{"quote and backslash", `a"b\c`, `"a\"b\\c"`},
		{"short escapes", "\b\f\n\r\t", `"\b\f\n\r\t"`},
		{"other controls", "\x00\x1f\x01", `"\u0000\u001f\u0001"`},
		{"no html escaping", "<a&b>", `"<a&b>"`},
		{"unicode kept", "✓ é 😀 \u2028", "\"✓ é 😀 \u2028\""},
		{"del kept", "\x7f", "\"\x7f\""},
		{"invalid utf-8", "a\xffb\xc3", `"a\ufffdb\ufffd"`},
		{"surrogate half", "\xed\xa0\x80", `"\ufffd\ufffd\ufffd"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := string(appendJSONString(nil, tt.in))
			if got != tt.want {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
			if !json.Valid([]byte(got)) || !utf8.ValidString(got) {
				t.Fatalf("not valid JSON: %q", got)
			}
			// Same value as encoding/json reads and writes it.
			var s string
			if err := json.Unmarshal([]byte(got), &s); err != nil {
				t.Fatal(err)
			}
			std, _ := json.Marshal(tt.in)
			var stdS string
			_ = json.Unmarshal(std, &stdS)
			if s != stdS {
				t.Fatalf("decodes to %q, encoding/json gives %q", s, stdS)
			}
		})
	}
}

func TestServerAck(t *testing.T) {
	m := fullMessage()
	got := ServerAck(m)
	want := &Message{Version: m.Version, ID: m.ID, Type: TypeServerAck, Channel: ChannelIndividual, Ephemeral: true,
		Source: "server", Destination: m.Source, ServerID: m.ServerID, ServerTimestamp: m.ServerTimestamp}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v, want %#v", got, want)
	}
}

func TestErrorNotice(t *testing.T) {
	n := ErrorNotice("alice", "m\"1", CodeNotMember, "you are not a member of \"g1\"\n", 99)
	var body struct{ Code, ID, Reason string }
	if err := json.Unmarshal(n.Content, &body); err != nil {
		t.Fatalf("content %s: %v", n.Content, err)
	}
	if body.Code != CodeNotMember || body.ID != "m\"1" || body.Reason != "you are not a member of \"g1\"\n" {
		t.Fatalf("body = %+v", body)
	}
	want := &Message{Version: 2.1, ID: "m\"1", Type: TypeNotification, Channel: ChannelIndividual, Ephemeral: true,
		Source: "server", Destination: "alice", Content: n.Content, Timestamp: 99, ServerTimestamp: 99,
		Meta: map[string]string{"action": "error", "category": "system", "code": CodeNotMember}}
	if !reflect.DeepEqual(n, want) {
		t.Fatalf("got %#v, want %#v", n, want)
	}
}
