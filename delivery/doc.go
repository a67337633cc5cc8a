// Package delivery owns each user's durable inbox and the group log, and gets
// every message in them to every device of the user (of each member), at
// least once and in stream order per subject, until that device acks it.
//
// # Assets (created idempotently by Setup)
//
//   - Stream INBOX, subjects msg.user.<user>: limits retention, file storage,
//     MaxAge = Config.Retention, MaxMsgsPerSubject = Config.MaxPerUser with
//     DiscardNew per subject (a full inbox rejects new mail; it never evicts
//     unread mail), AllowDirect, AllowAtomicPublish, republish to
//     deliver.user.<user>. There are no per-user consumers.
//   - Stream GROUP_LOG, subjects msg.group.<group> (ADR 4: a group message
//     is stored once, not once per member): limits retention, file storage,
//     MaxAge = Config.Retention, MaxMsgsPerSubject = Config.MaxPerGroup with
//     DiscardOld (a member offline for longer than the group's newest
//     MaxPerGroup messages misses the older ones), AllowDirect,
//     AllowAtomicPublish, republish to deliver.group.<group>. Written by the
//     router, with the sender's token in the Vartalap-Sender header. Never
//     purged by acks: it is shared by every member.
//   - KV cursors (file): key = user token, value
//     {"devices":{"<device>":{"floor":N,"acked":[seq…],"seen":ms,
//     "groups":{"<group>":{"floor":N,"acked":[…]}}}},"purged":P}. floor is
//     the device's contiguous ack floor (every INBOX seq of the user <= floor
//     is acked by it), acked the acked seqs above it. Written with CAS, at most
//     every Config.CursorFlush and when a session ends. After a write, the
//     user's subject is purged below the lowest floor over the devices and P
//     recorded, so the inbox holds only what some device still has to ack
//     (bounded by MaxAge). A device that has never connected is not waited
//     for; with no device left nothing is purged.
//   - KV presence (memory): key = user token, value
//     {"<device>":{"node":…,"since":<unix ms>,"session":…}}, CAS-updated when a
//     session opens and closes.
//   - KV nodes (memory, TTL 30s): key = node id, Put every 10s by Run. Online
//     counts a device only while its node's heartbeat is alive, so the users
//     of a crashed node go offline.
//
// # Subjects
//
// Consumed: deliver.user.<user> and deliver.group.<group> (core; one
// subscription per user with a session on this node and one per group with
// a member's session here, all feeding one channel and one dispatcher
// goroutine, which decodes a group message once for all its sessions), ctl.kick.<user>.<device> (core; one subscription per process).
// Published: ctl.kick.<user>.<device>
// ({"reason":"replaced","session":…,"node":…,"rev":…}) when a session opens;
// deliver.user.<user> by PublishEphemeral. Read: INBOX and GROUP_LOG by
// batched Direct Get (no consumers). rev is the revision of the new session's presence write:
// it orders a user's sessions across nodes, so a kick that arrives late never
// closes a session opened after the kicking one.
//
// # Delivery contract
//
// A session reads lanes: the user's INBOX subject and, with Config.Groups
// set, the GROUP_LOG subject of each group the user is or was a member of
// (schema.Membership: the group's sequences sent while a member). The
// memberships are loaded when the session starts and again whenever it
// delivers a group event (NOTIFICATION, action add, remove or delete, which
// the groups service stores in the inbox after the change); a failed load
// is retried with backoff. A group lane starts at the device's cursor for
// the group, or at the start of the membership; it skips messages sent
// outside the membership and the user's own (Vartalap-Sender); it is
// subscribed live only while the user is a member, is read to the
// membership's end after a removal, and dropped once all of that is acked
// (its cursor kept while the groups service still lists the membership, so
// nothing is delivered twice). A deleted group's lane and cursor are
// dropped: what its members had not received is not delivered. Everything
// below holds per lane; acks find their message in any lane.
//
// A Session subscribes first, loads the device cursor, reads the backlog
// from floor+1 in stream order (skipping seqs already acked) and then goes
// live. Republished messages carry Nats-Sequence and the per-subject
// Nats-Last-Sequence: a message at or below the session's position is a
// duplicate, one whose Nats-Last-Sequence is at or below the position is
// delivered from the live payload, anything else is a gap and the missing
// range is read from the stream first. Messages dropped on the way (a full
// channel or session queue) are detected and re-read the same way. Live
// messages without Nats-Sequence are ephemeral: delivered to every connected
// device, never tracked, stored or redelivered.
//
// At most Config.MaxInFlight unacked messages are outstanding per device
// (over all lanes);
// beyond that the session remembers that the stream has more and reads it
// when acks free half the window, so memory per session is bounded whatever
// senders do. (The cursor's acked list holds acks above the oldest unacked
// message; it is bounded by the inbox cap, MaxPerUser.)
// Ack maps message ids to in-flight seqs (all of them, ids may repeat). An
// acked message is never sent to that device again, also after reconnecting;
// an unacked one is sent again on the next connection and, while connected,
// every Config.AckTimeout. A Sink whose queue is full is closed with 1013
// ("slow consumer"); nothing is lost because the inbox holds it.
//
// A new Open of the same (user, device) replaces the old session: on this
// node it is closed with 4002 and its cursor flushed before the new one
// loads it; other nodes close theirs on the kick. Kicks with reason "logout"
// or "key_replaced" (from the profile service) close the device's sessions
// with 4001; "logout" also forgets the device's cursor.
//
// # Concurrency
//
// Each session's state is owned by its worker goroutine, which does
// catch-up, live delivery, acks, timers and flushes and exists only while
// there is work: a signal (a live message from the dispatcher, acks, a
// close, a due timer) starts it unless it runs, it exits when nothing is
// pending, and at most one runs per session. Ack and Close only signal it.
// The Service owns the workers: Open starts the first, and Run joins the
// sessions on exit (it closes them all; the last worker of a session runs
// its final flush). Timers are armed only while something is in flight,
// dirty or being retried, so an idle session costs no goroutine and a few
// hundred bytes (its buffers are dropped when its worker exits). Inbox reads
// are batched Direct Gets whose replies land on a channel sized for one
// batch. The dispatcher never blocks on a session. A live message for a
// session with no worker and nothing queued (a connected, idle device, the
// common case) is delivered on the dispatcher's goroutine, holding the
// worker role for that moment; anything that needs a stream read or a
// membership load is left to a worker it starts. A group message thus
// reaches 1,000 idle members without starting 1,000 goroutines. All
// exported methods are safe for concurrent use. Sink methods are called
// one at a time (from the worker or the dispatcher) and must not block or
// call Close.
//
// # Metrics
//
// The Service's collectors (metrics.go, shared by its sessions: a session
// holds none) are registered on Config.Metrics: vartalap_delivery_sessions,
// vartalap_delivery_delivered_total (messages handed to a sink the first
// time in a session, ephemeral ones included),
// vartalap_delivery_redelivered_total (after AckTimeout) and
// vartalap_delivery_acks_total (messages acked by a session, or by AckByID
// when the device has no session on this node).
package delivery
