// Package push sends push notifications (FCM data messages) to the devices of
// recipients that are not connected, and keeps push tokens clean.
//
// # What it owns
//
// The durable pull consumer "push" on the INBOX stream and, when
// Config.Groups is set, the durable pull consumer "push" on the GROUP_LOG
// stream (ADR 4; both streams are owned by delivery and must exist before
// Setup). Nothing else: device tokens live in profile, presence in delivery,
// group members in groups; they are reached through the small Devices,
// Presence and MemberLister interfaces, and the provider through Sender
// (package push/fcm for Firebase, NewLogSender for development).
//
// # Subjects
//
// Consumes msg.user.* (INBOX, protobuf schema.Message, one subject per
// recipient) and, with Config.Groups, msg.group.* (GROUP_LOG, the sender's
// protobuf schema.Message stored once per group message, header
// Vartalap-Sender = Token of the sender), each with one durable consumer
// shared by every push process. Both feed the same lookup workers and
// coalescer. It publishes nothing on NATS. Presence and Devices are queried
// per message and recipient (device lists cached for 5 s), Groups.Members
// per group message.
//
// # What is pushed
//
// A stored, non-ephemeral message of type MESSAGE or CUSTOM is pushed to each
// of the recipient's devices that has a token and is not online (presence
// checked when the message is read and again just before the push). Ephemeral
// messages are never stored, so never pushed; NOTIFICATION (receipts, group
// events, error notices), SERVER_ACK and CLIENT_ACK messages are skipped, and
// so are the copies of a user's own messages kept for their other devices.
// The consumers start at DeliverPolicy New: a new deployment does not push
// the backlog.
//
// The recipients of a GROUP_LOG message are the group's current members
// (Groups.Members when the message is read) except the sender (msg.Source
// and the Vartalap-Sender header); each gets the pushes an INBOX message of
// theirs would. Group messages still stored as INBOX copies (before ADR 4)
// are pushed as INBOX messages. A member added or removed between the send
// and the lookup may get a push too many or too few.
//
// The payload is the seed's (data-only message, data "message" = the JSON a
// text client receives for the message, Android priority "high") with three
// differences: the TTL is sent in seconds (Config.TTL, default 24h; the seed
// meant seconds but firebase-admin read its number as milliseconds, so its
// pushes expired after 30 ms to 86 s); a collapse key per conversation (the
// group id for GROUP messages, else the sender); and coalescing: per (user,
// device) at most one push per Config.Coalesce window, across both streams.
// The first message for a device opens a window; messages arriving inside it
// are folded into one push at the window's end that carries the latest
// message and, when more than one message was folded, data "count" = the
// number of messages (decimal string). The app syncs the rest over its
// socket. Latest is the highest stream sequence among messages of one
// stream; INBOX and GROUP_LOG sequences are not comparable, so between them
// it is the one that arrived (was looked up) last.
//
// # Delivery contract
//
// At-least-once towards the provider. A message (INBOX or GROUP_LOG; held
// messages are told apart by stream and sequence) is acked only after
// every push it contributes to was sent, given up on, or dropped with its
// token; until then it is held and its ack wait is extended (InProgress), so
// coalescing, slow providers and retries do not cause redeliveries. Lookup
// failures (members, presence, devices; one failing member retries the whole
// group message, nothing of it having been pushed) are NakWithDelay'd with
// growing backoff, up to MaxDeliver; a Members error for which
// Config.IsNoGroup reports true (the group is gone) acks the message without
// a push. Undecodable messages and bad subjects are terminated and
// logged. On shutdown held messages whose pushes were not completed are
// NakWithDelay'd for the next process; a push that was in flight may then be
// sent twice. Retryable provider errors (*RetryableError: 429, 5xx,
// timeouts) are retried in process with exponential backoff or the server's
// Retry-After, up to Config.MaxAttempts attempts, then given up and logged.
// ErrTokenInvalid makes the service call Devices.RemoveToken and never use
// that token again. (push/fcm's SDK itself retries 503 and network errors up
// to four times inside one attempt.)
//
// # Concurrency
//
// Config.Concurrency workers look members, devices and presence up (a group
// message's members one after another, in one worker) and as many send
// pushes, so a blocked provider call stalls at most that many pushes; each
// consumer's MaxAckPending bounds the messages held in memory. The push path
// is its own consumer: slow pushes never delay message delivery. Stats is
// safe to call at any time.
//
// # Metrics
//
// The counters of Stats are exported on Config.Metrics as
// vartalap_push_sent_total, vartalap_push_failed_total,
// vartalap_push_retries_total and vartalap_push_tokens_removed_total.
package push
