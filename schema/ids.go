package schema

import (
	"errors"
	"strings"
)

// Identifiers that come from clients. Each has a Valid method; nothing that
// fails it may reach storage, a NATS subject or a KV key.
//
// The allowlist for user, device and group ids is 1 to 64 bytes of
// ASCII letters, digits and "_", "-", "+", "@". That covers phone numbers in
// E.164 form ("+919999999999"), Firebase uids, UUIDs and plain names, and
// excludes everything that changes the meaning of a subject (".", "*", ">",
// whitespace) and every control character. "+" and "@" are not legal in NATS
// KV keys, so Token encodes them (see Token).
type (
	UserID    string
	DeviceID  string
	GroupID   string
	MessageID string
)

// MaxIDLen is the longest user, device or group id accepted.
const MaxIDLen = 64

// MaxMessageIDLen is the longest client message id accepted.
const MaxMessageIDLen = 128

// DefaultDevice is the device id used when a client names none (seed default).
const DefaultDevice DeviceID = "default"

// ErrInvalidID is returned (wrapped) by the Parse functions.
var ErrInvalidID = errors.New("invalid id")

func validToken(s string) bool {
	if len(s) == 0 || len(s) > MaxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '_', c == '-', c == '+', c == '@':
		default:
			return false
		}
	}
	return true
}

// Valid reports whether u is an acceptable user id. The name "server" is
// reserved for the server itself.
func (u UserID) Valid() bool { return validToken(string(u)) && u != ServerSource }

// Valid reports whether d is an acceptable device id.
func (d DeviceID) Valid() bool { return validToken(string(d)) }

// Valid reports whether g is an acceptable group id.
func (g GroupID) Valid() bool { return validToken(string(g)) }

// Valid reports whether m is an acceptable client message id: 1 to 128
// printable ASCII characters without spaces.
func (m MessageID) Valid() bool {
	if len(m) == 0 || len(m) > MaxMessageIDLen {
		return false
	}
	for i := 0; i < len(m); i++ {
		if m[i] <= ' ' || m[i] > '~' {
			return false
		}
	}
	return true
}

// Token encodes a valid id as a NATS subject token that is also a legal KV
// key: "+" becomes "=2B" and "@" becomes "=40". "=" never occurs in a valid
// id, so the encoding is reversible (ParseToken). Token must only be called
// on ids that passed Valid; it panics otherwise, because a bad token would
// silently change a subject's meaning.
func Token[T ~string](id T) string {
	s := string(id)
	if !validToken(s) {
		panic("schema: Token called with an invalid id")
	}
	if !strings.ContainsAny(s, "+@") {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 8)
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '+':
			b.WriteString("=2B")
		case '@':
			b.WriteString("=40")
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

// ParseToken reverses Token.
func ParseToken(tok string) (string, error) {
	if strings.ContainsAny(tok, "+@") {
		return "", ErrInvalidID // Token never leaves these raw: one id, one token
	}
	if !strings.Contains(tok, "=") {
		if !validToken(tok) {
			return "", ErrInvalidID
		}
		return tok, nil
	}
	r := strings.NewReplacer("=2B", "+", "=40", "@")
	s := r.Replace(tok)
	if strings.Contains(s, "=") || !validToken(s) {
		return "", ErrInvalidID
	}
	return s, nil
}

// ValidNode reports whether s is an acceptable process (node) name: 1 to 64
// of [A-Za-z0-9_-]. Node names appear in subjects (a gateway's CHAT_IN
// batches, delivery's presence) and KV keys as they are.
func ValidNode(s string) bool {
	if len(s) == 0 || len(s) > MaxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}
