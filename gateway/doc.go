// Package gateway is the WebSocket and HTTP edge for messaging. It owns the
// client connections: authentication of the upgrade, frame parsing, per
// connection rate and size limits, publishing accepted messages to the bus,
// SERVER_ACKs, error notices, and writing delivered messages to sockets.
// It owns no stream, bucket or consumer.
//
// # Routes (Gateway.Routes; the root router adds api.StripVersion for /v1.0)
//
//	GET  /wss, /wss/   WebSocket; query format=binary|text, ack=true|false
//	POST /messages     REST send (user + accesskey headers or cookies)
//	GET  /alive        "OK"; GET /healthz; GET /readyz
//	GET  /, /*         the static web client (Config.Static)
//
// # Subjects
//
// Publishes (never consumes):
//   - schema.ChatInBatch(node) (msg.in.batch.<node>, stream CHAT_IN, owned
//     by router): every accepted non-ephemeral client message, protobuf,
//     group-committed: what the connections of this process queued while
//     the previous write was in flight is one CHAT_IN message, a batch
//     (schema.ParseBatch, header Vartalap-Batch) of (message, device)
//     entries, up to 1 MiB. A resend of the same id is stored again; the
//     router stores one copy per recipient. WebSocket read loops do not wait
//     for the commit: SERVER_ACKs (in message order) and "unavailable"
//     notices are queued when its outcome is known.
//   - schema.Live(user) (msg.live.<user>, core NATS): ephemeral messages,
//     never stored.
//
// Delivery to sockets goes through the Deliverer (the delivery service): each
// socket opens one Session and is its Sink.
//
// # Guarantees
//
//   - The sender of every accepted message is the authenticated user; the
//     head.from / protobuf source a client sends is overwritten (the seed let
//     JSON clients spoof it).
//   - SERVER_ACK (when the socket asked with ack=true, or REST ack=true/1) is
//     sent only after the JetStream PubAck: the message is stored. A duplicate
//     PubAck (resend) is acknowledged too.
//   - No frame is dropped silently (the seed logged and dropped): a frame that
//     does not decode or validate, is too large, exceeds the rate limit or is
//     not stored gets an error notice (schema.ErrorNotice, rendered in the
//     socket's format) naming the message id when it is known, and the socket
//     stays open. Only a frame over the hard cap (max(4×MaxFrameBytes, 1 MiB))
//     closes the socket (1009).
//   - CLIENT_ACKs go to the delivery session (WebSocket) or Deliverer.AckByID
//     (REST; the seed lost REST acks). They are never published and not rate
//     limited.
//   - Any number of sockets per user and device pair is accepted here; the
//     delivery service decides which session wins (the seed kept one socket
//     per user and orphaned the others).
//
// # Concurrency
//
// Each socket has one goroutine while idle: its read loop (decode, validate,
// publish, one frame at a time, so messages of a connection are published
// in order), owned by the Gateway (Shutdown joins it); the HTTP handler
// returns right after the upgrade, so the server's per-request state is
// freed. A write goroutine exists only while there is something to write
// (a delivered message, a reply of the read loop, a due ping, a close): it
// is started on demand, exits when the queue is empty, at most one runs,
// and the read goroutine joins it before it ends. Pings come from a timer.
// An idle socket therefore holds one goroutine, its 1 KiB read buffer and
// no queue or write buffer (write buffers come from a pool per message).
// The outbound queue is bounded (OutboundQueue frames queued or being
// written): Sink.Deliver never blocks and returns false when it is full (a
// slow consumer; the delivery service then closes the socket, and the inbox
// still holds the messages). Frames produced by the read loop (pong, acks,
// error notices) wait for room instead, which stops reading from a client
// that does not read. Server pings every PingInterval; a socket silent for
// 2.5×PingInterval is dropped. Shutdown closes every socket with 1001 and
// waits for the loops.
//
// The writer takes everything queued at once and writes it with as few
// system calls as it fits in: the socket's connection is corked (cork.go)
// while the batch's frames are framed, then sent in one write of up to
// 64 KiB each. Frames to a busy socket (frames lately less than
// Config.WriteCoalesce apart, e.g. a member of a group getting 100
// messages/s) are held up to WriteCoalesce so that more join them: at 100
// group messages/s to 1,000 members that is about six frames per write
// instead of one or two, and the members' acks come back one write per
// read. Other sockets' frames, 8 queued frames and a catch-up (the delivery
// session calls Sink.Flush after frames read from a stream) go out at once.
//
// # Metrics
//
// The collectors (metrics.go) are registered on Config.Metrics:
// vartalap_gateway_connections (open WebSockets),
// vartalap_gateway_messages_total{result=accepted|rejected} (client messages
// over WebSocket and REST; CLIENT_ACKs and pings are not counted; a message
// answered with an error notice is rejected),
// vartalap_gateway_rejections_total{code} (schema.Code*),
// vartalap_gateway_commit_messages and vartalap_gateway_commit_seconds
// (client messages per CHAT_IN batch, publish to PubAck),
// vartalap_gateway_frames_written_total and
// vartalap_gateway_socket_writes_total (frames queued together share a
// write). Labels never carry ids.
package gateway
