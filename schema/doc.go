// Package schema is the wire contract of Vartalap: the canonical message
// model, its codecs, identifiers, subject builders and the reason codes sent
// to clients. It imports only the standard library and the protobuf runtime
// (encoding/protowire), holds no state, starts no goroutines, and every
// function in it is safe for concurrent use.
//
// # Model
//
// Message mirrors the seed's protobuf Message (proto/event-args.proto; a
// reference copy is event-args.proto in this directory). Every input format
// decodes into it and every output is rendered from it. On the bus (CHAT_IN,
// INBOX) messages travel as protobuf.
//
// # Formats
//
//   - Protobuf (binary WebSocket frames, base64 REST strings, the bus):
//     MarshalProto / AppendProto / UnmarshalProto / DecodeProto. The encoder
//     always writes version, type, channel and ephemeral, even when zero,
//     because seed clients (protobufjs) read an absent field as undefined: a
//     SERVER_ACK must carry type=0. Meta entries are written in sorted key
//     order, so equal messages encode to equal bytes. The decoder is strict
//     (malformed input, wrong wire types and invalid UTF-8 in strings are
//     errors) and skips unknown fields.
//   - JSON input (text frames, REST strings): DecodeJSON reads v2.0/v2.1
//     ({"_v","id","head","body"}) and legacy v1 ({msgId,to,text,type,...}).
//   - JSON output (text clients): RenderJSON / AppendJSON write the seed's
//     v2.1 shape including the legacy top-level copies, deterministically.
//
// Validate checks a decoded client message, Stamp sets the fields the server
// owns, ServerAck and ErrorNotice build the messages the server sends back.
//
// # Fixes versus the seed
//
//   - The sender is never taken from the frame (head.from, v1 from): the
//     gateway calls Stamp with the authenticated user (seed: JSON senders
//     could impersonate anyone).
//   - Rejected input is not dropped silently: DecodeJSON, DecodeProto and
//     Validate return a *DecodeError whose Code (the Code constants) the
//     gateway sends back in an ErrorNotice naming the message id.
//   - head.type accepts the README aliases ("chat", "channel", "bot") and
//     defaults to INDIVIDUAL; an unknown value is an error instead of being
//     lost on the bus. A missing contentType means MESSAGE.
//   - ephemeral may be the strings "true"/"false" (seed: dropped the frame).
//   - Head values that are objects or arrays keep their JSON text in Meta
//     (seed: "[object Object]").
//   - A JSON string body is kept and rendered (seed: a poison message for
//     text clients); binary content reaches text clients as
//     {"base64":"…"} instead of failing.
//   - v1 frames need no `state` and keep their type string (seed: v1 was
//     mostly broken).
//   - Meta cannot overwrite rendered head fields (type, from, to, ephemeral).
//   - Text clients also get "serverTimestamp" (seed: never).
//
// Kept from the seed: the top-level "meta" object of v2 frames is ignored,
// JSON output always says "_v":2.1, and version is a protobuf float (2.1
// reads back as 2.0999999).
//
// # Identifiers and subjects
//
// UserID, DeviceID, GroupID and MessageID come from clients; each has a
// Valid method, and nothing that fails it may reach storage, a subject or a
// KV key. Subjects are built only by the functions in subjects.go, which
// encode ids with Token.
package schema
