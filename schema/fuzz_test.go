package schema

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

// checkRendered fails unless out is valid UTF-8 JSON whose msgId and id name
// m's id (after the U+FFFD replacement encoding/json also applies).
func checkRendered(t *testing.T, m *Message, out []byte) {
	t.Helper()
	if !utf8.Valid(out) || !json.Valid(out) {
		t.Fatalf("RenderJSON output is not valid JSON: %q", out)
	}
	var got struct {
		ID    *string `json:"id"`
		MsgID *string `json:"msgId"`
		V     float64 `json:"_v"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	std, _ := json.Marshal(m.ID)
	var want string
	_ = json.Unmarshal(std, &want)
	if got.ID == nil || got.MsgID == nil || *got.ID != want || *got.MsgID != want || got.V != 2.1 {
		t.Fatalf("rendered id/msgId/_v wrong in %s for id %q", out, m.ID)
	}
	if again := AppendJSON([]byte("x"), m); !bytes.Equal(again[1:], out) {
		t.Fatal("AppendJSON differs from RenderJSON")
	}
}

// checkProtoRoundTrip fails unless m survives MarshalProto/UnmarshalProto.
func checkProtoRoundTrip(t *testing.T, m *Message) {
	t.Helper()
	b := m.MarshalProto()
	back, err := UnmarshalProto(b)
	if err != nil {
		t.Fatalf("UnmarshalProto(MarshalProto(%#v)): %v", m, err)
	}
	if !reflect.DeepEqual(back, m) && !(m.Version != m.Version && back.Version != back.Version) {
		t.Fatalf("round trip:\n got  %#v\n want %#v", back, m)
	}
}

// checkNoAlias fails if the message decode makes of data shares memory
// with data: the gateway reads every frame into one reused buffer, so a
// decoded message must survive the buffer being overwritten.
func checkNoAlias(t *testing.T, decode func([]byte) (*Message, error), data []byte, m *Message) {
	t.Helper()
	buf := bytes.Clone(data)
	got, err := decode(buf)
	if err != nil {
		t.Fatalf("decoding a copy: %v", err)
	}
	for i := range buf {
		buf[i] ^= 0xff
	}
	if !reflect.DeepEqual(got, m) && !(m.Version != m.Version && got.Version != got.Version) {
		t.Fatalf("decoded message changed with its input:\n got  %#v\n want %#v", got, m)
	}
}

func FuzzDecodeJSON(f *testing.F) {
	for _, s := range []string{
		`{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","to":"bob","from":"alice","chatid":"c1","contentType":"text","action":"message"},"meta":{"createdAt":123},"body":{"text":"hi"}}`,
		`{"_v":2.0,"id":"m2","head":{"type":"group","to":"g1","ephemeral":"TRUE","o":{"a":[1]}},"body":"s"}`,
		`{"msgId":"m3","to":"bob","chatId":"c1","text":"hi","type":"text","chatType":"INDIVIDUAL","action":"message","state":"new"}`,
		`{"_v":"2","id":"\u0000","head":null,"body":[1,{"text":null}]}`,
		`{"_v":2,"head":{"ephemeral":1}}`, `[]`, `ping`, `{}`, `{"_v":1e400}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := DecodeJSON(data)
		if err != nil {
			var de *DecodeError
			if !errors.As(err, &de) || de.Code == "" || m != nil {
				t.Fatalf("DecodeJSON error %T %v with message %v", err, err, m)
			}
			if de.ID != "" && !MessageID(de.ID).Valid() {
				t.Fatalf("error echoes an invalid id %q", de.ID)
			}
			return
		}
		if len(m.Content) > 0 && !json.Valid(m.Content) {
			t.Fatalf("Content is not JSON: %q", m.Content)
		}
		checkNoAlias(t, DecodeJSON, data, m)
		_ = m.Validate()
		m.Stamp("alice", "sid", 1)
		checkRendered(t, m, RenderJSON(m))
		checkProtoRoundTrip(t, m)
	})
}

func FuzzUnmarshalProto(f *testing.F) {
	f.Add(fullMessage().MarshalProto())
	f.Add((&Message{}).MarshalProto())
	f.Add(ErrorNotice("bob", "m", CodeInternal, "r", 1).MarshalProto())
	f.Add(unhex(f, "78 96 01 8101 0102030405060708 8a01 02 6869 9501 01020304 9b01 08 01 9c01 12 01 78"))
	f.Add(unhex(f, "52 03 0a 01 61 52 08 0a 01 61 18 07 12 01 77"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := UnmarshalProto(data)
		if err != nil {
			if m != nil {
				t.Fatal("message returned with an error")
			}
			return
		}
		checkNoAlias(t, UnmarshalProto, data, m)
		checkProtoRoundTrip(t, m)
		if m.Validate() == nil {
			m.Stamp("alice", "sid", 1)
		}
		checkRendered(t, m, RenderJSON(m))
	})
}

// FuzzRenderJSON renders arbitrary messages, including invalid UTF-8 and
// arbitrary content, and checks the output is always valid JSON.
func FuzzRenderJSON(f *testing.F) {
	f.Add("m1", "alice", "bob", []byte(`{"text":"hi"}`), "chatId", "c1", "action", "ack", int32(2), int32(1), true, uint64(5))
	f.Add("\xff", "\x00", "\"", []byte{0xff}, "_m", "\xfe", "from", "x", int32(0), int32(0), false, uint64(0))
	f.Add("", "", "", []byte(`"s"`), "contentType", "", "category", "", int32(-1), int32(99), false, uint64(1))
	f.Add("id", "s", "d", []byte(`{"text":"a","text":{"b":"}"}}`), "text", "\\", "\u2028", "<>&", int32(3), int32(2), true, uint64(1<<63))
	f.Fuzz(func(t *testing.T, id, src, dst string, content []byte, k1, v1, k2, v2 string, typ, ch int32, eph bool, sts uint64) {
		m := &Message{
			Version: 2.1, ID: id, Type: Type(typ), Channel: Channel(ch), Ephemeral: eph,
			Source: src, Destination: dst, Content: content, ServerTimestamp: sts,
			Meta: map[string]string{k1: v1, k2: v2},
		}
		out := RenderJSON(m)
		checkRendered(t, m, out)
		var top struct {
			Head map[string]json.RawMessage `json:"head"`
			Body json.RawMessage            `json:"body"`
		}
		if err := json.Unmarshal(out, &top); err != nil {
			t.Fatal(err)
		}
		if len(top.Body) == 0 || top.Head["type"] == nil || top.Head["category"] == nil {
			t.Fatalf("missing head.type, head.category or body in %s", out)
		}
	})
}

// tokenSpecial are the bytes that matter in subjects and KV keys.
const tokenSpecial = ".*> \t\r\n$%"

func FuzzToken(f *testing.F) {
	for c := 0; c < 256; c++ {
		f.Add(string([]byte{byte(c)}))
	}
	for i := 0; i < len(tokenSpecial); i++ {
		for j := 0; j < len(tokenSpecial); j++ {
			f.Add(string([]byte{tokenSpecial[i], tokenSpecial[j]}))
		}
	}
	for _, s := range []string{"alice", "+919999999999", "a@b", "=2B", "a=40b", "x+@+", strings.Repeat("z", MaxIDLen)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		valid := UserID(s).Valid() || s == ServerSource
		if valid != DeviceID(s).Valid() || valid != GroupID(s).Valid() {
			t.Fatalf("id types disagree on %q", s)
		}
		if !valid {
			if !panics(func() { Token(s) }) {
				t.Fatalf("Token(%q) of an invalid id did not panic", s)
			}
		} else {
			tok := Token(s)
			if strings.ContainsAny(tok, ".*> \t\r\n\f\v") || tok == "" {
				t.Fatalf("Token(%q) = %q is not a safe subject token", s, tok)
			}
			for i := 0; i < len(tok); i++ {
				if tok[i] <= ' ' || tok[i] > '~' {
					t.Fatalf("Token(%q) = %q has a non-printable byte", s, tok)
				}
			}
			back, err := ParseToken(tok)
			if err != nil || back != s {
				t.Fatalf("ParseToken(Token(%q)) = %q, %v", s, back, err)
			}
			if UserID(s).Valid() {
				u, err := UserFromSubject(UserInbox(UserID(s)))
				if err != nil || string(u) != s {
					t.Fatalf("UserFromSubject(UserInbox(%q)) = %q, %v", s, u, err)
				}
			}
		}
		// ParseToken of arbitrary input never panics, returns only valid ids,
		// and accepts nothing but Token's output (one id, one token).
		if id, err := ParseToken(s); err == nil {
			if !validToken(id) {
				t.Fatalf("ParseToken(%q) = invalid id %q", s, id)
			}
			if Token(id) != s {
				t.Fatalf("ParseToken(%q) = %q but Token(%q) = %q", s, id, id, Token(id))
			}
		}
	})
}

func panics(fn func()) (p bool) {
	defer func() { p = recover() != nil }()
	fn()
	return false
}
