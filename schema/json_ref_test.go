package schema

import (
	"encoding/json"
	"reflect"
	"testing"
	"unicode/utf8"
)

// The decoder as it was before the single-pass member scanner (session 1):
// encoding/json into maps. Kept as the reference the fast decoder must
// agree with (FuzzDecodeJSONMatchesReference).

func refDecodeJSON(data []byte) (*Message, error) {
	if !utf8.Valid(data) {
		return nil, decodeErr(CodeMalformed, "", "frame is not valid utf-8")
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil || top == nil {
		return nil, decodeErr(CodeMalformed, "", "frame is not a json object")
	}
	version, ok := jsonVersion(top["_v"])
	if !ok {
		return nil, decodeErr(CodeMalformed, "", "_v is not a number")
	}
	if version >= 2 {
		return refDecodeV2(top, version)
	}
	return refDecodeV1(top)
}

func refDecodeV2(top map[string]json.RawMessage, version float64) (*Message, error) {
	m := &Message{Version: float32(version), Type: TypeMessage, Channel: ChannelIndividual}
	id, _, ok := jsonString(top["id"])
	if !ok {
		return nil, decodeErr(CodeBadID, "", "id is not a string")
	}
	m.ID = id

	var head map[string]json.RawMessage
	if raw := top["head"]; !isNull(raw) {
		if raw[0] != '{' {
			return nil, decodeErr(CodeMalformed, id, "head is not an object")
		}
		if err := json.Unmarshal(raw, &head); err != nil {
			return nil, decodeErr(CodeMalformed, id, "head is not an object")
		}
	}

	if s, present, ok := jsonString(head[headType]); !ok {
		return nil, decodeErr(CodeBadChannel, id, "head.type is not a string")
	} else if present {
		c, known := ParseChannel(s)
		if !known {
			return nil, decodeErr(CodeBadChannel, id, "head.type names no channel")
		}
		m.Channel = c
	}

	if s, present, ok := jsonString(head[headContentType]); !ok {
		return nil, decodeErr(CodeBadType, id, "head.contentType is not a string")
	} else if present {
		if t, known := ParseType(s); known {
			m.Type = t
		}
		m.setMeta(MetaContentType, s)
	}

	eph, ok := jsonEphemeral(head[headEphemeral])
	if !ok {
		return nil, decodeErr(CodeBadEphemeral, id, "head.ephemeral is not a boolean")
	}
	m.Ephemeral = eph

	to, _, ok := jsonString(head[headTo])
	if !ok {
		return nil, decodeErr(CodeBadTo, id, "head.to is not a string")
	}
	m.Destination = to

	for k, raw := range head {
		switch k {
		case headType, headFrom, headTo, headContentType, headEphemeral:
			continue
		}
		if v, ok := metaValue(raw); ok {
			m.setMeta(k, v)
		}
	}

	if raw, ok := top["body"]; ok {
		m.Content = compactJSON(raw)
	}
	return m, nil
}

func refDecodeV1(top map[string]json.RawMessage) (*Message, error) {
	m := &Message{Version: 1, Type: TypeMessage, Channel: ChannelIndividual}
	id, _, ok := jsonString(top["msgId"])
	if !ok {
		return nil, decodeErr(CodeBadID, "", "msgId is not a string")
	}
	m.ID = id

	// The seed reads `chatType || module`: an empty chatType falls through.
	chatType, present, ok := jsonString(top["chatType"])
	if !ok {
		return nil, decodeErr(CodeBadChannel, id, "chatType is not a string")
	}
	if !present || chatType == "" {
		module, mPresent, ok := jsonString(top["module"])
		if !ok {
			return nil, decodeErr(CodeBadChannel, id, "module is not a string")
		}
		if mPresent {
			chatType, present = module, true
		}
	}
	if present {
		c, known := ParseChannel(chatType)
		if !known {
			return nil, decodeErr(CodeBadChannel, id, "chatType names no channel")
		}
		m.Channel = c
	}

	if s, present, ok := jsonString(top["type"]); !ok {
		return nil, decodeErr(CodeBadType, id, "type is not a string")
	} else if present {
		if t, known := ParseType(s); known {
			m.Type = t
		}
		m.setMeta(MetaContentType, s)
	}

	to, _, ok := jsonString(top["to"])
	if !ok {
		return nil, decodeErr(CodeBadTo, id, "to is not a string")
	}
	m.Destination = to

	if raw, ok := top["text"]; ok {
		c := make([]byte, 0, len(raw)+10)
		c = append(c, `{"text":`...)
		c = append(c, compactJSON(raw)...)
		m.Content = append(c, '}')
	} else {
		m.Content = []byte("{}")
	}

	chatID := top["chatId"]
	if isNull(chatID) || string(chatID) == `""` {
		chatID = top["chatid"]
	}
	if v, ok := metaValue(chatID); ok {
		m.setMeta(MetaChatID, v)
	}
	for _, k := range [...]string{MetaAction, "state"} {
		if v, ok := metaValue(top[k]); ok {
			m.setMeta(k, v)
		}
	}
	return m, nil
}

// The fast decoder agrees with the reference on every input: same message
// or same error.
func FuzzDecodeJSONMatchesReference(f *testing.F) {
	for _, s := range []string{
		`{"_v":2.1,"id":"m1","head":{"type":"INDIVIDUAL","to":"bob","from":"alice","chatid":"c1","contentType":"text","action":"message"},"meta":{"createdAt":123},"body":{"text":"hi"}}`,
		`{"_v":2.0,"id":"m2","head":{"type":"group","to":"g1","ephemeral":"TRUE","o":{"a":[1]}},"body":"s"}`,
		`{"msgId":"m3","to":"bob","chatId":"c1","text":"hi","type":"text","chatType":"INDIVIDUAL","action":"message","state":"new"}`,
		` { "_v" : 2 , "id" : "d" , "head" : { "to" : "x" , "to" : null , "k" : 1 , "k" : null } , "body" : { "a" : [ 1 , "}" ] } } `,
		`{"_v":"2","id":"\u0000","head":null,"body":[1,{"text":null}]}`,
		`{"\u005fv":2,"i\u0064":"e","head":{"t\u006f":"bob","x\"y":"z"},"body":"a\\b"}`,
		`{"_v":2,"head":{"ephemeral":1}}`, `[]`, `ping`, `{}`, `{"_v":1e400}`, `null`, `"s"`, `{"a":}`,
		`{"msgId":"m","msgId":"n","text":"t","text":null,"chatId":"","chatid":"c"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, gotErr := DecodeJSON(data)
		want, wantErr := refDecodeJSON(data)
		if (gotErr == nil) != (wantErr == nil) {
			t.Fatalf("input %q: error %v, reference error %v", data, gotErr, wantErr)
		}
		if gotErr != nil {
			if !reflect.DeepEqual(gotErr, wantErr) {
				t.Fatalf("input %q: error %#v, reference %#v", data, gotErr, wantErr)
			}
			return
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("input %q:\n got %#v\nwant %#v", data, got, want)
		}
	})
}

func BenchmarkDecodeJSONReference(b *testing.B) {
	data := []byte(benchJSON)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := refDecodeJSON(data); err != nil {
			b.Fatal(err)
		}
	}
}
