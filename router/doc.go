// Package router routes every accepted client message to the inbox of its
// recipient, or, for a group message, to the group's log.
//
// # What it owns
//
// The stream CHAT_IN (schema.StreamChatIn, subjects msg.in.>, limits
// retention with routed messages purged in bulk, file storage, at most
// Config.MaxBacklogBytes (1 GiB; past it new messages are refused, and
// gateways ask their clients to resend), messages up to 1 MiB + 64 KiB) and
// its durable pull consumer "router". Setup creates or updates both
// idempotently. It writes to INBOX and GROUP_LOG, which delivery owns and
// creates.
//
// # Subjects
//
// Consumed:
//   - msg.in.> through the durable consumer "router": gateway batches on
//     msg.in.batch.<node> (schema.ParseBatch: many senders' messages, each
//     stamped with its authenticated sender), and single messages on
//     msg.in.<sender> (protobuf schema.Message; the subject must name its
//     source).
//   - msg.live.<sender> (core NATS, queue group "router"): ephemeral
//     messages, never stored anywhere.
//
// Published:
//   - msg.user.<recipient> (stream INBOX, owned by delivery): one copy of each
//     direct message, the unchanged protobuf bytes, with Nats-Msg-Id
//     "c:<Token(recipient)>:<Token(sender)>:<client message id>", so a
//     client's resend and a retry of a batch store one copy; error notices
//     (NOTIFICATION from "server", meta action "error") to the sender's
//     inbox with Nats-Msg-Id "e:<Token(sender)>:<client message id>".
//   - msg.group.<group> (stream GROUP_LOG, owned by delivery; ADR 4): each
//     group message once, the unchanged protobuf bytes, with Nats-Msg-Id
//     "g:<Token(group)>:<Token(sender)>:<client message id>" and header
//     Vartalap-Sender (schema.HeaderSender) carrying Token(sender), so
//     delivery can skip the sender's own message without decoding it.
//   - deliver.user.<recipient> (core NATS): ephemeral messages, group ones
//     too (one publish per member).
//
// Requested: group membership through the MemberLister given in Config.
//
// # Routing
//
// 1:1 (and OTHER/UNKNOWN channels) go to the destination's inbox. A GROUP
// message from a current member of the group (the MemberLister is asked
// once per group and round) is stored once, on the group's GROUP_LOG
// subject, whatever the group's size, with the group id kept as
// destination; no member gets an INBOX copy (delivery reads the log for
// each member within its membership epochs and skips the sender's own
// messages). A member alone in its group still has the message stored. A
// sender who is not a member gets a "not_member" notice and nothing is
// stored; an unknown group (or no MemberLister) gets "unknown_group". A
// destination that is no valid user id (or group id, for a group message)
// gets "bad_to". Notices go to the sender's inbox. A recipient whose inbox
// is at its per-subject cap does not get the copy and the sender gets
// "inbox_full"; a group message never does, since GROUP_LOG drops a group's
// oldest messages (DiscardOld) rather than refuse a new one. Ephemeral
// group messages are not stored: they are published live to every member
// but the sender. CLIENT_ACKs never reach CHAT_IN (the gateway handles
// them); one that does is acked and dropped.
//
// # Delivery contract
//
// At least once, exactly-once storage within the INBOX and GROUP_LOG
// duplicate windows (2 minutes): Run fetches up to Config.Batch CHAT_IN
// messages, routes them all, writes every resulting copy as JetStream atomic
// batches (at most 1,000 messages each; under sync: always that is one fsync
// per batch, not per copy; an atomic batch spans one stream, so a round's
// group messages go to GROUP_LOG in batches of their own, then its INBOX
// copies and notices) and only then acks the CHAT_IN messages. A CHAT_IN
// message is acked only after all its copies are stored. When an atomic batch
// is rejected (one holding a resend already stored is rejected as a whole)
// its copies are published each on its own (pipelined) to isolate the
// failure: a duplicate is success, a full inbox is answered with a notice,
// anything else is transient and the CHAT_IN message is negatively acknowledged with a delay growing
// with its delivery count (capped below the duplicate window, so a retry
// stores each copy once). A CHAT_IN batch is acked or retried as a whole. An
// undecodable CHAT_IN message is terminated and logged, never retried; an
// undecodable entry of a batch is logged and dropped, and the rest routed. A
// message still failing on its last allowed delivery is terminated and
// logged.
//
// # Order and concurrency
//
// One Run processes batches sequentially, so copies enter every inbox, and
// group messages every group's log, in CHAT_IN order. Several router
// processes share the durable consumer and are then competing consumers:
// messages of one conversation may be routed by different processes
// concurrently. Keeping per-conversation order across router replicas needs a
// partition token in CHAT_IN subjects and one consumer per partition; that is
// future work. A message that is retried after a transient failure can also
// be overtaken by later messages.
//
// Run owns all its goroutines and returns only after they have ended.
//
// # Cost
//
// Copies are cheap (one fsync per atomic batch of up to 1,000), and a group
// message is one stored message, not one per member. CHAT_IN has limits
// retention, not work-queue: on a work-queue stream every ack removes a
// message and under sync: always that removal is fsynced on its own
// (measured: about 0.6 to 0.9 ms per ack on a loaded 2-core VM, against about
// 10 µs per ack on a limits-retention stream), which bounded 1:1 throughput.
// Instead the router purges everything at or below the consumer's ack floor
// every 250 ms (one operation). So no other consumer may be added to CHAT_IN:
// it would lose what the router purges.
//
// # Metrics
//
// The collectors (metrics.go) are registered on Config.Metrics:
// vartalap_router_messages_total{kind=direct|group|ephemeral|client_ack|poison},
// vartalap_router_copies_total (stored copies: one per direct message, one
// per group message in GROUP_LOG) and vartalap_router_notices_total{code}
// (counted when the CHAT_IN message is acked or terminated, so a retried
// batch counts once), vartalap_router_retries_total (CHAT_IN messages
// NakWithDelay'd) and vartalap_router_round_seconds (routeBatch).
package router
