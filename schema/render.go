package schema

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// RenderJSON renders m for a text client (see AppendJSON).
func RenderJSON(m *Message) []byte {
	n := 256 + 2*(len(m.ID)+len(m.Source)+len(m.Destination)) + len(m.Content)*4/3
	for k, v := range m.Meta {
		n += len(k) + len(v) + 6
	}
	return AppendJSON(make([]byte, 0, n), m)
}

// AppendJSON appends the JSON a text client receives for m to b: the seed's
// v2.1 shape with the legacy top-level copies (seed MessageEvent.toString),
// byte-for-byte the seed's output for the same message except that
//
//   - Meta entries are written in sorted key order (deterministic);
//   - "category" is always the last head key;
//   - Meta keys that would shadow a head field ("type", "from", "to",
//     "ephemeral") are not written (the seed let them overwrite the real
//     values, e.g. a spoofed "from");
//   - content that is not JSON (binary) is rendered as {"base64":"…"} instead
//     of failing, and a JSON string body is rendered (with "text" set to it);
//   - "serverTimestamp" is added at the end when non-zero.
//
// The shape: {"_v":2.1,"id","head":{"type","from","to","contentType",
// "ephemeral",<meta>,"category"},"body","from","to","msgId","type",
// "chatId","text","module","action","chatType","serverTimestamp"}. "from"
// and "to" are omitted when empty; "chatId" and "action" only appear when
// Meta has those keys; "text" is body.text when body is an object that has a
// "text" key (omitted for objects and arrays without one), the string itself
// for a string body, else "[unknown]". A null body renders as {} (seed
// `body || {}`). Strings are escaped as JSON.stringify does; invalid UTF-8
// becomes U+FFFD, so the output is always valid JSON.
func AppendJSON(b []byte, m *Message) []byte {
	channel := m.Channel.String()
	contentType, ok := m.Meta[MetaContentType]
	if !ok {
		contentType = m.Type.String()
	}

	b = append(b, `{"_v":2.1,"id":`...)
	b = appendJSONString(b, m.ID)
	b = append(b, `,"head":{"type":`...)
	b = appendJSONString(b, channel)
	if m.Source != "" {
		b = append(b, `,"from":`...)
		b = appendJSONString(b, m.Source)
	}
	if m.Destination != "" {
		b = append(b, `,"to":`...)
		b = appendJSONString(b, m.Destination)
	}
	b = append(b, `,"contentType":`...)
	b = appendJSONString(b, contentType)
	if m.Ephemeral {
		b = append(b, `,"ephemeral":true`...)
	} else {
		b = append(b, `,"ephemeral":false`...)
	}
	b = appendMetaJSON(b, m.Meta)
	b = append(b, `,"category":`...)
	b = appendJSONString(b, category(m.Meta))
	b = append(b, `},"body":`...)
	start := len(b)
	b, binary := appendBody(b, m.Content)
	text, hasText := bodyText(b[start:], binary)

	if m.Source != "" {
		b = append(b, `,"from":`...)
		b = appendJSONString(b, m.Source)
	}
	if m.Destination != "" {
		b = append(b, `,"to":`...)
		b = appendJSONString(b, m.Destination)
	}
	b = append(b, `,"msgId":`...)
	b = appendJSONString(b, m.ID)
	b = append(b, `,"type":`...)
	b = appendJSONString(b, contentType)
	if v, ok := m.Meta["chatId"]; ok {
		b = append(b, `,"chatId":`...)
		b = appendJSONString(b, v)
	}
	if hasText {
		b = append(b, `,"text":`...)
		b = append(b, text...)
	}
	b = append(b, `,"module":`...)
	b = appendJSONString(b, channel)
	if v, ok := m.Meta[MetaAction]; ok {
		b = append(b, `,"action":`...)
		b = appendJSONString(b, v)
	}
	b = append(b, `,"chatType":`...)
	b = appendJSONString(b, channel)
	if m.ServerTimestamp != 0 {
		b = append(b, `,"serverTimestamp":`...)
		b = strconv.AppendUint(b, m.ServerTimestamp, 10)
	}
	return append(b, '}')
}

// skipMetaKey reports whether a Meta key is not written into head.
func skipMetaKey(k string) bool {
	switch k {
	case MetaContentType, MetaCategory, headType, headFrom, headTo, headEphemeral:
		return true
	}
	return strings.HasPrefix(k, "_m")
}

func appendMetaJSON(b []byte, meta map[string]string) []byte {
	if len(meta) == 0 {
		return b
	}
	var arr [16]string
	keys := arr[:0]
	for k := range meta {
		if !skipMetaKey(k) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		b = append(b, ',')
		b = appendJSONString(b, k)
		b = append(b, ':')
		b = appendJSONString(b, meta[k])
	}
	return b
}

// category is head.category: the Meta value when non-empty, else "system"
// for the receipt actions "state" and "ack", else "message" (seed rule).
func category(meta map[string]string) string {
	if c := meta[MetaCategory]; c != "" {
		return c
	}
	switch meta[MetaAction] {
	case "state", "ack":
		return "system"
	}
	return "message"
}

// appendBody writes content as the body value: compact JSON when it is valid
// UTF-8 JSON, {} when empty or null, else {"base64":"…"} with binary true.
func appendBody(b, content []byte) (_ []byte, binary bool) {
	if len(content) == 0 {
		return append(b, "{}"...), false
	}
	start := len(b)
	if utf8.Valid(content) {
		buf := bytes.NewBuffer(b)
		if err := json.Compact(buf, content); err == nil {
			b = buf.Bytes()
			if string(b[start:]) == "null" {
				b = append(b[:start], "{}"...)
			}
			return b, false
		}
	}
	b = b[:start]
	b = append(b, `{"base64":"`...)
	b = base64.StdEncoding.AppendEncode(b, content)
	return append(b, `"}`...), true
}

// bodyText returns the legacy top-level "text" for a rendered body (seed:
// typeof body === 'object' ? body.text : '[unknown]', with a string body
// rendered as itself). binary marks a {"base64":…} body made from non-JSON
// content, which is "[unknown]".
func bodyText(body []byte, binary bool) ([]byte, bool) {
	if binary {
		return []byte(`"[unknown]"`), true
	}
	switch body[0] {
	case '{':
		return objectField(body, "text")
	case '[':
		return nil, false
	case '"':
		return body, true
	}
	return []byte(`"[unknown]"`), true
}

// objectField returns the raw value of key in a compact, valid JSON object
// (the last one when the key repeats, as JSON.parse does).
func objectField(obj []byte, key string) (val []byte, found bool) {
	i := 1
	for i < len(obj) && obj[i] == '"' {
		kEnd := skipJSONString(obj, i)
		k := obj[i:kEnd]
		i = kEnd + 1 // ':'
		vEnd := skipJSONValue(obj, i)
		if vEnd <= i {
			return val, found
		}
		if jsonKeyEquals(k, key) {
			val, found = obj[i:vEnd], true
		}
		i = vEnd
		if i < len(obj) && obj[i] == ',' {
			i++
		}
	}
	return val, found
}

// skipJSONString returns the index after the string starting at b[i] == '"'.
func skipJSONString(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return len(b)
}

// skipJSONValue returns the index after the JSON value at b[i] (valid JSON;
// a number or literal ends at whitespace too).
func skipJSONValue(b []byte, i int) int {
	if i >= len(b) {
		return len(b)
	}
	switch b[i] {
	case '"':
		return skipJSONString(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); {
			switch b[j] {
			case '"':
				j = skipJSONString(b, j)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
			j++
		}
		return len(b)
	}
	for j := i; j < len(b); j++ {
		switch b[j] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return j
		}
	}
	return len(b)
}

func jsonKeyEquals(quoted []byte, key string) bool {
	if len(quoted) < 2 {
		return false
	}
	inner := quoted[1 : len(quoted)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return string(inner) == key
	}
	var s string
	return json.Unmarshal(quoted, &s) == nil && s == key
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string escaped the way JSON.stringify
// does it (", \, \b, \f, \n, \r, \t, other controls as \u00xx, nothing else),
// replacing invalid UTF-8 with U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r != utf8.RuneError || size != 1 {
				i += size
				continue
			}
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\b':
			b = append(b, '\\', 'b')
		case '\f':
			b = append(b, '\\', 'f')
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		}
		i++
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// ServerAck builds the SERVER_ACK for an accepted message m (seed
// buildServerAckMessage): same Version and ID, type SERVER_ACK, channel
// INDIVIDUAL, ephemeral, from "server" to m's sender, same ServerID and
// ServerTimestamp, no content or meta.
func ServerAck(m *Message) *Message {
	return &Message{
		Version:         m.Version,
		ID:              m.ID,
		Type:            TypeServerAck,
		Channel:         ChannelIndividual,
		Ephemeral:       true,
		Source:          ServerSource,
		Destination:     m.Source,
		ServerID:        m.ServerID,
		ServerTimestamp: m.ServerTimestamp,
	}
}

// ErrorNotice builds the error frame sent to user to when message msgID is
// rejected (the seed dropped such messages silently): an ephemeral
// NOTIFICATION from "server" with meta action "error", category "system" and
// the reason code, and body {"code","id","reason"}. reason must be safe to
// show to a client (never an internal err.Error()).
func ErrorNotice(to UserID, msgID, code, reason string, nowMs uint64) *Message {
	c := make([]byte, 0, 32+len(code)+len(msgID)+len(reason))
	c = append(c, `{"code":`...)
	c = appendJSONString(c, code)
	c = append(c, `,"id":`...)
	c = appendJSONString(c, msgID)
	c = append(c, `,"reason":`...)
	c = appendJSONString(c, reason)
	c = append(c, '}')
	return &Message{
		Version:     2.1,
		ID:          msgID,
		Type:        TypeNotification,
		Channel:     ChannelIndividual,
		Ephemeral:   true,
		Source:      ServerSource,
		Destination: string(to),
		Content:     c,
		Timestamp:   nowMs,
		Meta: map[string]string{
			MetaAction:   "error",
			MetaCategory: "system",
			"code":       code,
		},
		ServerTimestamp: nowMs,
	}
}
