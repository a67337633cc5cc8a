// Package push sends push notifications (FCM data messages) to the devices of
// recipients that are not connected, and keeps push tokens clean.
//
// # What it owns
//
// The durable pull consumer "push" on the INBOX stream (the stream itself is
// owned by delivery and must exist before Setup). Nothing else: device tokens
// live in profile, presence in delivery; both are reached through the small
// Devices and Presence interfaces, and the provider through Sender (package
// push/fcm for Firebase, NewLogSender for development).
//
// # Subjects
//
// Consumes msg.user.* (INBOX, protobuf schema.Message, one subject per
// recipient) with one durable consumer shared by every push process. It
// publishes nothing on NATS. Presence and Devices are queried per message.
//
// # What is pushed
//
// A stored, non-ephemeral message of type MESSAGE or CUSTOM is pushed to each
// of the recipient's devices that has a token and is not online (presence
// checked when the message is read and again just before the push). Ephemeral
// messages are never stored, so never pushed; NOTIFICATION (receipts, group
// events, error notices), SERVER_ACK and CLIENT_ACK messages are skipped, and
// so are the copies of a user's own messages kept for their other devices.
// The consumer starts at DeliverPolicy New: a new deployment does not push
// the backlog.
//
// The payload is the seed's (data-only message, data "message" = the JSON a
// text client receives for the message, Android priority "high") with three
// differences: the TTL is sent in seconds (Config.TTL, default 24h; the seed
// meant seconds but firebase-admin read its number as milliseconds, so its
// pushes expired after 30 ms to 86 s); a collapse key per conversation (the
// group id for GROUP messages, else the sender); and coalescing: per (user,
// device) at most one push per Config.Coalesce window. The first message for
// a device opens a window; messages arriving inside it are folded into one
// push at the window's end that carries the latest message (highest stream
// sequence) and, when more than one message was folded, data "count" = the
// number of messages (decimal string). The app syncs the rest over its
// socket.
//
// # Delivery contract
//
// At-least-once towards the provider. An INBOX message is acked only after
// every push it contributes to was sent, given up on, or dropped with its
// token; until then it is held and its ack wait is extended (InProgress), so
// coalescing, slow providers and retries do not cause redeliveries. Lookup
// failures (presence, devices) are NakWithDelay'd with growing backoff, up to
// MaxDeliver; undecodable messages and bad subjects are terminated and
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
// Config.Concurrency workers look devices and presence up and as many send
// pushes, so a blocked provider call stalls at most that many pushes; the
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
