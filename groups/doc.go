// Package groups owns groups: the group REST API, the membership store in
// the NATS KV bucket "groups", and group events.
//
// # Model
//
// A group has a random UUID v4 id, a name (1 to 100 characters), an optional
// picture and members, each with role "admin" or "user" and a join
// sequence. The creator becomes admin (added if absent from the list); the
// others are users. Any member may add members (new ones are users,
// existing members are skipped); a member may leave; only an admin may
// remove others, rename, change the picture, change roles or delete the
// group. When the last admin leaves, the longest-standing remaining member
// (lowest join sequence) becomes admin; the last admin can't be demoted;
// when the last member leaves, the group is deleted. A group has at most
// Config.MaxMembers members (default 1024); a change that would exceed it is
// refused whole with 409 {"error":"member_limit"}.
//
// Usernames in create and add requests must pass schema.UserID.Valid: a
// request naming any invalid username is rejected whole with 400
// {"error":"invalid_username","invalid":[…]} and changes nothing (the seed
// stored anything). Duplicates are collapsed: each user is stored once. One
// request lists at most MaxMembersPerRequest usernames.
//
// # Storage (KV bucket "groups" = stream KV_groups, owned and created by Setup)
//
//	g.<gid>.meta        {groupId,name,profilePic,addedOn,createdBy,nextJoin}
//	g.<gid>.m.<user>    {username,role,addedOn,join}   one key per membership
//	u.<user>.g.<gid>    {groupId,addedOn,epochs:[{since,until?}…],removedOn?}
//	                    reverse index and membership epochs (ADR 4)
//
// User and group ids are encoded with schema.Token. Every change of a group
// (create, add, remove, rename, role, delete) is one JetStream atomic batch
// whose first message rewrites g.<gid>.meta with an expected last subject
// sequence (compare-and-set on its revision); on a conflict the change is
// planned again on a fresh snapshot. So membership checks (is the caller a
// member, an admin, the last admin; how many members) are always decided on
// a consistent state, join sequences (meta.nextJoin) are unique, and two
// concurrent adds of one user store it once. A member key and its index key
// are always written in the same batch. Removed keys are purged with a
// short-lived marker (per-message TTL), so the bucket's stream enables
// AllowAtomicPublish and AllowMsgTTL beyond the usual KV settings.
//
// Reads create no consumer: a group is one multi_last batched Direct Get of
// g.<gid>.meta and g.<gid>.m.* (an isolated snapshot); a user's groups are
// one multi_last of u.<user>.g.* followed by one read per group whose index
// entry is open (closed ones are skipped unread); the group's members are
// still checked. When a request would match more than the server's 1,024
// subjects (very large groups, users in very many groups) the read falls
// back to paged batched Direct Gets; for a group, validated by an unchanged
// meta revision before and after. Deleting a group purges its meta together
// with its members' index keys in one atomic batch (the group disappears at
// once; above 999 members the remaining index keys follow), and its member
// keys afterwards. A deleted group keeps no tombstones: its members'
// undelivered messages are dropped. Closed entries of members removed
// before the deletion stay until they expire.
//
// # Membership epochs (ADR 4)
//
// A group message is stored once, on the group's subject msg.group.<gid> in
// the GROUP_LOG stream (owned by the delivery package; this package only
// reads it). The index value u.<user>.g.<gid> records which of those
// messages the user may receive, as schema.Epoch periods in GROUP_LOG
// sequences: the user receives seq with since < seq, and seq < until once
// the epoch is closed.
//
//   - Create and add: each new member's epoch opens at since = the sequence
//     of the last message on msg.group.<gid> when the change is planned (0
//     if the subject has none), read with one Direct Get (last_by_subj) per
//     attempt. If it cannot be read (GROUP_LOG missing, a timeout) the
//     change fails with 503 and writes nothing: a guessed since could show a
//     new member the group's history. A message stored between that read
//     and the commit is seen by the new member.
//   - A re-added user keeps its earlier, closed epochs (read from its index
//     value in the same attempt, one multi_last of the exact keys) and gets
//     a new open one; at most 16 are kept, the oldest dropped.
//   - Remove and leave: the member key is purged, and the index key is
//     rewritten in the same batch with its last epoch closed at until = (the
//     last sequence of the group's subject, read as above) + 1 and removedOn
//     = now (ms). It carries a per-message TTL of Config.Retention (default
//     30 days, the INBOX/GROUP_LOG retention), after which the server drops
//     it. A message stored between the read and the commit is not seen by
//     the removed member. When the last member leaves, the group is deleted
//     and its keys are purged as by a delete.
//   - An index value written before epochs existed (no "epochs") stands for
//     one open epoch {since: 0}.
//
// Service.Memberships(user) lists a user's index entries, open and closed,
// epochs as stored, sorted by group id, leaving out closed ones removed
// more than Config.Retention ago. It reads the index alone (one multi_last
// of u.<user>.g.*, paged when larger) and trusts it: commit writes every
// index key in the same atomic batch as the membership it describes, under
// the group meta's compare-and-set.
//
// # Group events
//
// Every change stores NOTIFICATION messages (seed group-event.js): version
// 3.0, channel INDIVIDUAL, source = the actor, destination = the group id,
// Meta {chatId, chatid, contentType "notification", action}, one copy per
// receiver on schema.UserInbox(receiver) with Nats-Msg-Id
// "<eventId>:<receiver>":
//
//	create        add     {"added":[{"username","role"}…]}     all members
//	add           add     {"added":[{"username","role":"user"}…]}  existing ∪ new members
//	remove/leave  remove  {"removed":["<username>"]}           members before the removal
//	  (+ admin hand-over: role {"username","role":"admin"} to the remaining members)
//	rename/pic    update  {"name"?,"profilePic"?}              all members
//	role change   role    {"username","role"}                  all members
//	delete        delete  {"deleted":true}                     members before the deletion
//
// The copies are written as atomic batches (at most 1000 messages each)
// into the INBOX stream (owned by the delivery package; this package never
// creates it), and the HTTP answer is sent only after they are stored. If
// they cannot be stored the answer is 503: the change itself is already
// committed (and logged). The seed published without waiting.
//
// # HTTP routes (Routes; without /v1.0; each also under /group; all need auth)
//
//	GET    /groups/  (/groups, legacy /group/get)         the caller's groups
//	POST   /groups/  (legacy /group/create)               {"name","members",["profilePic"]} → {"groupId"}
//	GET    /groups/{groupId}                              the group; 404 if unknown or caller not a member
//	PATCH  /groups/{groupId}                              {"name"?,"profilePic"?} (admins) → the group
//	DELETE /groups/{groupId}                              (admins) → {"status":true}
//	POST   /groups/{groupId}/members  (legacy …/add)      {"members"} → {"status":true,"added":[…]}
//	DELETE /groups/{groupId}/members  (legacy POST …/remove)  {"member"?} (missing: the caller leaves) → {"status":true}
//	PUT    /groups/{groupId}/members/{username}/role      {"role"} (admins) → {"status":true}
//
// A group is {"groupId","name","members":[{"username","role"}],"profilePic"}.
// Errors are JSON api.ErrorBody: 400 bad input, 401, 403 admin required,
// 404 unknown group or caller not a member, 409 member_limit / last_admin,
// 503 store, GROUP_LOG (create, add, remove) or events unavailable.
// Removing a non-member succeeds (seed).
//
// # Subjects
//
// Served by Run, as the nats micro service "groups":
//
//	groups.members      {"group"} → {"members":[…]}, or micro error "404"
//	groups.memberships  {"user"}  → {"memberships":[{"group","epochs":[{"since","until"?}…]}…]},
//	                    or micro error "400" (invalid user)
//
// Client is the thin NATS client for it; Service.Members and Client.Members
// both fit the router's MemberLister and return ErrNotFound (wrapped) for a
// missing group; Service.Memberships and Client.Memberships return an
// error wrapping schema.ErrInvalidID for an invalid user. Published: INBOX
// msg.user.<user> (group events). Read: GROUP_LOG, Direct Get
// ($JS.API.DIRECT.GET.GROUP_LOG, honoring the JetStream API prefix or
// domain) of the last message on msg.group.<gid>.
//
// # Concurrency
//
// Service is safe for concurrent use and keeps no state in memory: every
// process serving the API or the micro service reads and writes the bucket,
// and the meta CAS serialises the changes of one group (different groups
// never contend). Run only serves the micro service; it returns after ctx
// ends and the service is stopped.
package groups
