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
//	u.<user>.g.<gid>    {groupId,addedOn}              reverse index
//
// User and group ids are encoded with schema.Token. Every change of a group
// (create, add, remove, rename, role, delete) is one JetStream atomic batch
// whose first message rewrites g.<gid>.meta with an expected last subject
// sequence (compare-and-set on its revision); on a conflict the change is
// planned again on a fresh snapshot. So membership checks (is the caller a
// member, an admin, the last admin; how many members) are always decided on
// a consistent state, join sequences (meta.nextJoin) are unique, and two
// concurrent adds of one user store it once. Removed keys are purged with a
// short-lived marker (per-message TTL), so the bucket's stream enables
// AllowAtomicPublish and AllowMsgTTL beyond the usual KV settings.
//
// Reads create no consumer: a group is one multi_last batched Direct Get of
// g.<gid>.meta and g.<gid>.m.* (an isolated snapshot); a user's groups are
// one multi_last of u.<user>.g.* followed by one read per group. The index
// is written before and removed after the membership it points to, and
// listing checks membership, so a stale index entry is never shown. When a
// request would match more than the server's 1,024 subjects (very large
// groups) the read falls back to paged batched Direct Gets, validated by an
// unchanged meta revision before and after. Deleting a group purges its
// meta first (the group disappears at once) and its member and index keys
// afterwards.
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
// 503 store or events unavailable. Removing a non-member succeeds (seed).
//
// # Subjects
//
// Served by Run, as the nats micro service "groups":
//
//	groups.members  {"group"} → {"members":[…]}, or micro error "404"
//
// Client is the thin NATS client for it; Service.Members and Client.Members
// both fit the router's MemberLister and return ErrNotFound (wrapped) for a
// missing group. Published: INBOX msg.user.<user> (group events).
//
// # Concurrency
//
// Service is safe for concurrent use and keeps no state in memory: every
// process serving the API or the micro service reads and writes the bucket,
// and the meta CAS serialises the changes of one group (different groups
// never contend). Run only serves the micro service; it returns after ctx
// ends and the service is stopped.
package groups
