package schema

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Reason codes carried by DecodeError and by error notices to clients
// (ErrorNotice). They are stable: clients may branch on them.
const (
	CodeMalformed    = "malformed"     // not a JSON object / undecodable protobuf
	CodeMissingID    = "missing_id"    // no message id
	CodeBadID        = "bad_id"        // message id is not a valid MessageID
	CodeMissingTo    = "missing_to"    // no destination
	CodeBadTo        = "bad_to"        // destination is not a valid user or group id
	CodeBadChannel   = "bad_channel"   // head.type / chatType names no channel
	CodeBadType      = "bad_type"      // contentType not a string, or a type a client may not send
	CodeBadEphemeral = "bad_ephemeral" // ephemeral is neither a boolean nor "true"/"false"
	CodeTooLarge     = "too_large"     // frame or request exceeds the size limit
	CodeUnavailable  = "unavailable"   // the bus did not accept the message; retry later
	CodeNotMember    = "not_member"    // sender is not a member of the group
	CodeInboxFull    = "inbox_full"    // recipient's inbox is at its limit
	CodeRateLimited  = "rate_limited"  // sender exceeded its rate limit
	CodeInternal     = "internal"      // unexpected server failure
	CodeUnknownGroup = "unknown_group" // the group does not exist
)

// DecodeError describes why a client message was rejected. Code is one of
// the Code constants; ID is the message id when it could be read and is a
// valid MessageID (an invalid id is never echoed: it may be huge or contain
// control characters); Reason is a short human-readable detail that never
// echoes large input.
type DecodeError struct {
	Code   string // stable snake_case reason code (Code constants)
	ID     string // the message id when it could be read, else ""
	Reason string // human-readable detail
}

func (e *DecodeError) Error() string {
	if e.ID != "" {
		return "message " + e.ID + ": " + e.Code + ": " + e.Reason
	}
	return "message: " + e.Code + ": " + e.Reason
}

func decodeErr(code, id, reason string) *DecodeError {
	if !MessageID(id).Valid() {
		id = ""
	}
	return &DecodeError{Code: code, ID: id, Reason: reason}
}

// Head keys that map to Message fields instead of Meta.
const (
	headType        = "type"
	headFrom        = "from"
	headTo          = "to"
	headContentType = "contentType"
	headEphemeral   = "ephemeral"
)

// DecodeJSON decodes a text frame or REST string: JSON v2.x (`_v` >= 2) or
// legacy v1 (`_v` absent, 0 or below 2). It differs from the seed on
// purpose: the sender named in the frame (head.from, v1 from) is ignored
// (the gateway sets Source), missing head.type means INDIVIDUAL, missing
// contentType means MESSAGE, ephemeral may be the strings "true"/"false",
// head values that are objects keep their JSON text, a JSON string body is
// kept, and v1 frames need no `state`. Timestamp, Source, ServerID and
// ServerTimestamp are left zero (see Stamp). Errors are *DecodeError.
//
// A JSON null anywhere DecodeJSON reads a field means "absent".
func DecodeJSON(data []byte) (*Message, error) {
	if !utf8.Valid(data) {
		return nil, decodeErr(CodeMalformed, "", "frame is not valid utf-8")
	}
	if !json.Valid(data) {
		return nil, decodeErr(CodeMalformed, "", "frame is not a json object")
	}
	var buf [12]member
	top, ok := objectMembers(data, buf[:])
	if !ok {
		return nil, decodeErr(CodeMalformed, "", "frame is not a json object")
	}
	version, ok := jsonVersion(top.get("_v"))
	if !ok {
		return nil, decodeErr(CodeMalformed, "", "_v is not a number")
	}
	if version >= 2 {
		return decodeV2(top, version)
	}
	return decodeV1(top)
}

// jsonVersion reads `_v`: a number or a numeric string; absent or null is 0.
func jsonVersion(raw json.RawMessage) (float64, bool) {
	if isNull(raw) {
		return 0, true
	}
	s := string(raw)
	if raw[0] == '"' {
		var ok bool
		if s, ok = unquote(raw); !ok {
			return 0, false
		}
		s = strings.TrimSpace(s)
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, false
	}
	return v, true
}

func isNull(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null"
}

// jsonString reads an optional string field. present is false for absent or
// null; ok is false when the value is not a string.
func jsonString(raw json.RawMessage) (s string, present, ok bool) {
	if isNull(raw) {
		return "", false, true
	}
	if raw[0] != '"' {
		return "", true, false
	}
	s, ok = unquote(raw)
	return s, true, ok
}

// unquote decodes a JSON string literal from already validated input.
func unquote(raw json.RawMessage) (string, bool) {
	if len(raw) >= 2 && bytes.IndexByte(raw[1:len(raw)-1], '\\') < 0 {
		return string(raw[1 : len(raw)-1]), true
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", false
	}
	return s, true
}

// metaValue converts a head value to its Meta string: strings as-is,
// numbers as their JSON text, booleans "true"/"false", objects and arrays as
// compact JSON text. ok is false for null (skipped).
func metaValue(raw json.RawMessage) (string, bool) {
	if isNull(raw) {
		return "", false
	}
	switch raw[0] {
	case '"':
		if s, ok := unquote(raw); ok {
			return s, true
		}
	case '{', '[':
		var buf bytes.Buffer
		if err := json.Compact(&buf, raw); err == nil {
			return buf.String(), true
		}
	}
	return string(raw), true
}

// compactJSON returns raw without insignificant whitespace, as the seed's
// JSON.stringify would write it.
func compactJSON(raw json.RawMessage) []byte {
	if !bytes.ContainsAny(raw, " \t\n\r") {
		return append([]byte(nil), raw...) // already compact
	}
	var buf bytes.Buffer
	buf.Grow(len(raw))
	if err := json.Compact(&buf, raw); err != nil {
		// raw came out of a successful json.Unmarshal, so it is valid.
		return append([]byte(nil), raw...)
	}
	return buf.Bytes()
}

func decodeV2(top members, version float64) (*Message, error) {
	m := &Message{Version: float32(version), Type: TypeMessage, Channel: ChannelIndividual}
	id, _, ok := jsonString(top.get("id"))
	if !ok {
		return nil, decodeErr(CodeBadID, "", "id is not a string")
	}
	m.ID = id

	var head members
	var headBuf [12]member
	if raw := top.get("head"); !isNull(raw) {
		if raw[0] != '{' {
			return nil, decodeErr(CodeMalformed, id, "head is not an object")
		}
		if head, ok = objectMembers(raw, headBuf[:]); !ok {
			return nil, decodeErr(CodeMalformed, id, "head is not an object")
		}
	}

	if s, present, ok := jsonString(head.get(headType)); !ok {
		return nil, decodeErr(CodeBadChannel, id, "head.type is not a string")
	} else if present {
		c, known := ParseChannel(s)
		if !known {
			return nil, decodeErr(CodeBadChannel, id, "head.type names no channel")
		}
		m.Channel = c
	}

	if s, present, ok := jsonString(head.get(headContentType)); !ok {
		return nil, decodeErr(CodeBadType, id, "head.contentType is not a string")
	} else if present {
		if t, known := ParseType(s); known {
			m.Type = t
		}
		m.setMeta(MetaContentType, s)
	}

	eph, ok := jsonEphemeral(head.get(headEphemeral))
	if !ok {
		return nil, decodeErr(CodeBadEphemeral, id, "head.ephemeral is not a boolean")
	}
	m.Ephemeral = eph

	to, _, ok := jsonString(head.get(headTo))
	if !ok {
		return nil, decodeErr(CodeBadTo, id, "head.to is not a string")
	}
	m.Destination = to

	for i, mb := range head {
		switch string(mb.key) {
		case headType, headFrom, headTo, headContentType, headEphemeral:
			continue
		}
		if head.shadowed(i) {
			continue // a later member of the same key wins
		}
		if v, ok := metaValue(mb.raw); ok {
			m.setMeta(string(mb.key), v)
		}
	}

	if top.has("body") {
		m.Content = compactJSON(top.get("body"))
	}
	return m, nil
}

// jsonEphemeral reads head.ephemeral: a boolean or the string "true" or
// "false" in any case; absent or null is false. ok is false otherwise.
func jsonEphemeral(raw json.RawMessage) (v, ok bool) {
	switch string(raw) {
	case "", "null", "false":
		return false, true
	case "true":
		return true, true
	}
	if s, _, isStr := jsonString(raw); isStr {
		switch strings.ToLower(s) {
		case "true":
			return true, true
		case "false":
			return false, true
		}
	}
	return false, false
}

func decodeV1(top members) (*Message, error) {
	m := &Message{Version: 1, Type: TypeMessage, Channel: ChannelIndividual}
	id, _, ok := jsonString(top.get("msgId"))
	if !ok {
		return nil, decodeErr(CodeBadID, "", "msgId is not a string")
	}
	m.ID = id

	// The seed reads `chatType || module`: an empty chatType falls through.
	chatType, present, ok := jsonString(top.get("chatType"))
	if !ok {
		return nil, decodeErr(CodeBadChannel, id, "chatType is not a string")
	}
	if !present || chatType == "" {
		module, mPresent, ok := jsonString(top.get("module"))
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

	if s, present, ok := jsonString(top.get("type")); !ok {
		return nil, decodeErr(CodeBadType, id, "type is not a string")
	} else if present {
		if t, known := ParseType(s); known {
			m.Type = t
		}
		m.setMeta(MetaContentType, s)
	}

	to, _, ok := jsonString(top.get("to"))
	if !ok {
		return nil, decodeErr(CodeBadTo, id, "to is not a string")
	}
	m.Destination = to

	if top.has("text") {
		raw := top.get("text")
		c := make([]byte, 0, len(raw)+10)
		c = append(c, `{"text":`...)
		c = append(c, compactJSON(raw)...)
		m.Content = append(c, '}')
	} else {
		m.Content = []byte("{}")
	}

	chatID := top.get("chatId")
	if isNull(chatID) || string(chatID) == `""` {
		chatID = top.get("chatid")
	}
	if v, ok := metaValue(chatID); ok {
		m.setMeta(MetaChatID, v)
	}
	for _, k := range [...]string{MetaAction, "state"} {
		if v, ok := metaValue(top.get(k)); ok {
			m.setMeta(k, v)
		}
	}
	return m, nil
}

func (m *Message) setMeta(k, v string) {
	if m.Meta == nil {
		m.Meta = make(map[string]string, 4)
	}
	m.Meta[k] = v
}

// DecodeProto decodes a binary frame (one protobuf Message). Errors are
// *DecodeError with Code CodeMalformed.
func DecodeProto(data []byte) (*Message, error) {
	m, err := UnmarshalProto(data)
	if err != nil {
		return nil, &DecodeError{Code: CodeMalformed, Reason: err.Error()}
	}
	return m, nil
}

// Validate checks a decoded client message (JSON or protobuf) before the
// server accepts it. It returns a *DecodeError or nil:
//   - the id must be a valid MessageID (CodeMissingID, CodeBadID);
//   - the type must be one a client may send: not SERVER_ACK and not an
//     unknown enum number (CodeBadType); the channel must be a known enum
//     number (CodeBadChannel);
//   - a CLIENT_ACK needs nothing else, but its destination, when set, must be
//     "server" (CodeBadTo);
//   - every other message needs a destination (CodeMissingTo) that is a valid
//     GroupID for channel GROUP and a valid UserID otherwise (CodeBadTo).
func (m *Message) Validate() error {
	if m.ID == "" {
		return decodeErr(CodeMissingID, "", "message id is missing")
	}
	if !MessageID(m.ID).Valid() {
		return decodeErr(CodeBadID, "", "message id is not 1 to 128 printable ascii characters")
	}
	if _, known := typeNames[m.Type]; !known {
		return decodeErr(CodeBadType, m.ID, "unknown message type")
	}
	if m.Type == TypeServerAck {
		return decodeErr(CodeBadType, m.ID, "clients may not send SERVER_ACK")
	}
	if _, known := channelNames[m.Channel]; !known {
		return decodeErr(CodeBadChannel, m.ID, "unknown channel")
	}
	if m.Type == TypeClientAck {
		if m.Destination != "" && m.Destination != ServerSource {
			return decodeErr(CodeBadTo, m.ID, `a CLIENT_ACK goes to "server"`)
		}
		return nil
	}
	if m.Destination == "" {
		return decodeErr(CodeMissingTo, m.ID, "destination is missing")
	}
	if m.Channel == ChannelGroup {
		if !GroupID(m.Destination).Valid() {
			return decodeErr(CodeBadTo, m.ID, "destination is not a valid group id")
		}
		return nil
	}
	if !UserID(m.Destination).Valid() {
		return decodeErr(CodeBadTo, m.ID, "destination is not a valid user id")
	}
	return nil
}

// Stamp sets the fields the server owns on an accepted client message:
// Source is the authenticated user (whatever the client claimed), ServerID
// and ServerTimestamp are the gateway's, and Timestamp becomes nowMs when the
// client sent none (JSON input never has one).
func (m *Message) Stamp(user UserID, serverID string, nowMs uint64) {
	m.Source = string(user)
	m.ServerID = serverID
	m.ServerTimestamp = nowMs
	if m.Timestamp == 0 {
		m.Timestamp = nowMs
	}
}
