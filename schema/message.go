package schema

import "strings"

// Type is the kind of a message (protobuf enum Message.Type, seed-compatible numbers).
type Type int32

// Message types. The numbers are the seed's protobuf enum values and must not change.
const (
	TypeServerAck    Type = 0
	TypeClientAck    Type = 1
	TypeMessage      Type = 2
	TypeNotification Type = 3
	TypeCustom       Type = 10
)

var typeNames = map[Type]string{
	TypeServerAck:    "SERVER_ACK",
	TypeClientAck:    "CLIENT_ACK",
	TypeMessage:      "MESSAGE",
	TypeNotification: "NOTIFICATION",
	TypeCustom:       "CUSTOM",
}

// String returns the seed's enum name, e.g. "CLIENT_ACK".
func (t Type) String() string {
	if s, ok := typeNames[t]; ok {
		return s
	}
	return "UNKNOWN_TYPE"
}

// ParseType maps an enum name (any case) to a Type.
func ParseType(s string) (Type, bool) {
	u := strings.ToUpper(strings.TrimSpace(s))
	for t, n := range typeNames {
		if n == u {
			return t, true
		}
	}
	return 0, false
}

// Channel says where a message goes (protobuf enum Message.Channel).
type Channel int32

// Channels. The numbers are the seed's protobuf enum values and must not change.
const (
	ChannelUnknown    Channel = 0
	ChannelIndividual Channel = 1
	ChannelGroup      Channel = 2
	ChannelOther      Channel = 10
)

var channelNames = map[Channel]string{
	ChannelUnknown:    "UNKNOWN",
	ChannelIndividual: "INDIVIDUAL",
	ChannelGroup:      "GROUP",
	ChannelOther:      "OTHER",
}

// String returns the seed's enum name, e.g. "GROUP".
func (c Channel) String() string {
	if s, ok := channelNames[c]; ok {
		return s
	}
	return "UNKNOWN"
}

// ParseChannel maps a channel name to a Channel. It accepts the seed's enum
// names in any case and the README's lower-case aliases ("chat" means
// INDIVIDUAL, "channel" and "bot" mean OTHER).
func ParseChannel(s string) (Channel, bool) {
	switch strings.ToUpper(strings.TrimSpace(s)) {
	case "INDIVIDUAL", "CHAT":
		return ChannelIndividual, true
	case "GROUP":
		return ChannelGroup, true
	case "OTHER", "CHANNEL", "BOT":
		return ChannelOther, true
	case "UNKNOWN":
		return ChannelUnknown, true
	}
	return 0, false
}

// Message is the canonical message model: the seed's protobuf Message
// (proto/event-args.proto). Every wire format decodes into it and every
// output is rendered from it. On the bus (CHAT_IN, INBOX) it travels as
// protobuf (MarshalProto / UnmarshalProto).
type Message struct {
	Version     float32           // field 1: format version the client used (1.0, 2.0, 2.1, 3.0)
	ID          string            // field 2: client-chosen message id; acks name it
	Type        Type              // field 3
	Channel     Channel           // field 4
	Ephemeral   bool              // field 5: never stored, never pushed
	Source      string            // field 6: sender; always the authenticated user
	Destination string            // field 7: user id, group id, or "server"
	Content     []byte            // field 8: body; for JSON input the raw JSON of "body"
	Timestamp   uint64            // field 9: ms since epoch (JSON input: server receive time)
	Meta        map[string]string // field 10: the extra head fields, strings only

	ServerID        string // field 20: assigned by the gateway on receipt
	ServerTimestamp uint64 // field 21: ms since epoch, assigned by the gateway
}

// ServerSource is the Source of messages the server itself generates
// (SERVER_ACK, error notifications).
const ServerSource = "server"

// Well-known meta keys.
const (
	MetaContentType = "contentType" // original head.contentType string, echoed back unchanged
	MetaAction      = "action"      // head.action
	MetaChatID      = "chatid"      // head.chatid
	MetaCategory    = "category"    // head.category
)

// Action returns Meta["action"] ("" when absent).
func (m *Message) Action() string { return m.Meta[MetaAction] }
