package schema

// Stream, bucket and subject names. Every subject built from an id goes
// through one of the functions below, which encode the id with Token.

// Streams and buckets.
const (
	StreamChatIn   = "CHAT_IN"   // owned by router; work queue of accepted client messages
	StreamInbox    = "INBOX"     // owned by delivery; per-user durable inbox
	StreamGroupLog = "GROUP_LOG" // owned by delivery; each group message stored once
	BucketCursors  = "cursors"   // owned by delivery; per-user device cursors
	BucketPresence = "presence"  // owned by delivery; online devices
	BucketGroups   = "groups"    // owned by groups
)

// Subject prefixes and wildcards.
const (
	SubjectChatInAll    = "msg.in.>"       // CHAT_IN stream subjects
	SubjectInboxAll     = "msg.user.*"     // INBOX stream subjects
	SubjectLiveAll      = "msg.live.*"     // core: ephemeral messages for the router (never stored)
	SubjectDeliverAll   = "deliver.user.*" // core: live delivery (INBOX republish + ephemeral)
	SubjectDeliverRepub = "deliver.user.{{wildcard(1)}}"
	SubjectKickAll      = "ctl.kick.*.*" // core: close a device's sockets (logout, key replaced)

	SubjectGroupLogAll       = "msg.group.*"     // GROUP_LOG stream subjects
	SubjectDeliverGroupAll   = "deliver.group.*" // core: live delivery of GROUP_LOG messages (republish)
	SubjectDeliverGroupRepub = "deliver.group.{{wildcard(1)}}"
)

// ChatIn is the CHAT_IN subject a message from user u is published on.
func ChatIn(u UserID) string { return "msg.in." + Token(u) }

// ChatInBatch is the CHAT_IN subject a gateway stores its batches on (see
// ParseBatch): four tokens, so it never equals ChatIn of a user.
func ChatInBatch(node string) string { return "msg.in.batch." + node }

// Live is the core subject an ephemeral message from user u is published on.
func Live(u UserID) string { return "msg.live." + Token(u) }

// UserInbox is u's subject in the INBOX stream.
func UserInbox(u UserID) string { return "msg.user." + Token(u) }

// Deliver is the core subject live messages for u arrive on.
func Deliver(u UserID) string { return "deliver.user." + Token(u) }

// GroupLog is g's subject in the GROUP_LOG stream.
func GroupLog(g GroupID) string { return "msg.group." + Token(g) }

// DeliverGroup is the core subject live messages of group g arrive on.
func DeliverGroup(g GroupID) string { return "deliver.group." + Token(g) }

// Kick is the core subject that closes the sockets of device d of user u.
func Kick(u UserID, d DeviceID) string { return "ctl.kick." + Token(u) + "." + Token(d) }

// UserFromSubject returns the user id encoded in the last token of an
// INBOX, deliver or CHAT_IN subject (GroupFromSubject's counterpart).
func UserFromSubject(subject string) (UserID, error) {
	i := len(subject) - 1
	for i >= 0 && subject[i] != '.' {
		i--
	}
	s, err := ParseToken(subject[i+1:])
	return UserID(s), err
}

// GroupFromSubject returns the group id encoded in the last token of a
// GROUP_LOG or deliver.group subject.
func GroupFromSubject(subject string) (GroupID, error) {
	u, err := UserFromSubject(subject)
	return GroupID(u), err
}

// NATS header names used on the bus.
const (
	HeaderMsgID    = "Nats-Msg-Id"        // JetStream de-duplication
	HeaderSequence = "Nats-Sequence"      // set on republished INBOX messages
	HeaderLastSeq  = "Nats-Last-Sequence" // per-subject previous sequence on republished messages
	HeaderStoredAt = "Nats-Time-Stamp"    // when the stream stored a republished message (RFC 3339)
	HeaderDevice   = "Vartalap-Device"    // sending device on CHAT_IN messages
	HeaderBatch    = "Vartalap-Batch"     // on a CHAT_IN batch: its format version, "1"
	HeaderSender   = "Vartalap-Sender"    // on GROUP_LOG messages: Token of the sending user
)
