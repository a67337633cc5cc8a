package groups

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/api"
)

// Defaults and limits.
const (
	// DefaultMaxMembers is the default member limit of one group.
	DefaultMaxMembers = 1024
	// DefaultReplicas is the default replica count of the groups bucket.
	DefaultReplicas = 1
	// MaxMembersPerRequest is the most usernames one create or add request
	// may list. One membership change writes two keys, and a change is one
	// atomic batch (at most 1000 messages) together with the group's meta.
	MaxMembersPerRequest = 256
	// MaxNameLen is the longest group name, in characters.
	MaxNameLen = 100
	// MaxProfilePicLen is the longest profilePic value, in bytes.
	MaxProfilePicLen = 2048
	// DefaultRetention is the default Config.Retention: the retention of
	// the INBOX and GROUP_LOG streams.
	DefaultRetention = 30 * 24 * time.Hour
)

// Roles of a member.
const (
	RoleAdmin = "admin"
	RoleUser  = "user"
)

// Internal tuning.
const (
	// maxAtomicBatch is the server's limit of messages in one atomic batch.
	maxAtomicBatch = 1000
	// markerTTL is how long a purge marker of a removed key stays in the
	// bucket. Markers only matter to a concurrent writer; once they expire
	// the key's subject is gone, so purged keys do not count against the
	// 1,024 subjects one multi_last Direct Get may match (a removed member's
	// index key does, until it expires after Config.Retention).
	markerTTL = 2 * time.Second
	// maxCASAttempts bounds the retries of one membership change that keeps
	// losing the compare-and-set on the group's meta key.
	maxCASAttempts = 100
	// opTimeout bounds one NATS round trip when the caller's ctx has no
	// deadline.
	opTimeout = 10 * time.Second
	// lockStripes is the number of process-local group change locks.
	lockStripes = 64
	// eventAttempts is how often an INBOX batch of group events is tried.
	eventAttempts = 3
	// maxEpochs is the most membership epochs one index value keeps; the
	// oldest go first.
	maxEpochs = 16
)

// ErrNotFound is returned (wrapped) when a group does not exist. Callers that
// are not members are told the same (a group's existence is not disclosed).
var ErrNotFound = errors.New("group not found")

// Errors of membership changes; the HTTP layer maps them to statuses.
var (
	errForbidden    = errors.New("admin role required")
	errLastAdmin    = errors.New("cannot demote the last admin")
	errMemberLimit  = errors.New("member limit exceeded")
	errNotMember    = errors.New("not a member")
	errTooContended = errors.New("too many concurrent changes")
)

// Config configures a Service.
type Config struct {
	// JS is the JetStream context for the groups bucket, the INBOX stream
	// (group events) and GROUP_LOG (read only: the last sequence of a
	// group's log when its membership changes). Required.
	JS jetstream.JetStream
	// NC is the connection the micro service "groups" is served on.
	// Default: JS.Conn().
	NC *nats.Conn
	// Logger receives the service's logs. Default: discard.
	Logger *slog.Logger
	// Auth authenticates HTTP requests. Required.
	Auth api.Authenticator
	// MaxMembers is the largest number of members of one group. Default
	// 1024.
	MaxMembers int
	// Replicas is the replica count of the groups bucket. Default 1.
	Replicas int
	// Retention is how long a removed member's closed membership is kept
	// (Memberships reports it, and its index key expires after it): the
	// retention of the INBOX and GROUP_LOG streams. Default 30 days; at
	// least one second.
	Retention time.Duration
}

// Service is the groups service: the REST API, the membership store and the
// group events. It is safe for concurrent use.
type Service struct {
	js         jetstream.JetStream
	nc         *nats.Conn
	log        *slog.Logger
	auth       api.Authenticator
	maxMembers int
	replicas   int
	retention  time.Duration
	now        func() time.Time
	stripes    [lockStripes]chan struct{} // per-group change locks, see mutate
	members    memberCache                // Members results by meta revision
	up         chan struct{}              // closed once Run serves its endpoints
}

// New returns a Service for cfg, with defaults filled in. Setup must be
// called before the service is used.
func New(cfg Config) (*Service, error) {
	if cfg.JS == nil {
		return nil, errors.New("groups: config: JS is required")
	}
	if cfg.Auth == nil {
		return nil, errors.New("groups: config: Auth is required")
	}
	if cfg.NC == nil {
		cfg.NC = cfg.JS.Conn()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxMembers == 0 {
		cfg.MaxMembers = DefaultMaxMembers
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = DefaultReplicas
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultRetention
	}
	switch {
	case cfg.MaxMembers < 1:
		return nil, fmt.Errorf("groups: config: max members %d is not positive", cfg.MaxMembers)
	case cfg.Replicas < 1:
		return nil, fmt.Errorf("groups: config: replicas %d is not positive", cfg.Replicas)
	case cfg.Retention < time.Second:
		return nil, fmt.Errorf("groups: config: retention %v is shorter than a second", cfg.Retention)
	}
	s := &Service{
		up:         make(chan struct{}),
		js:         cfg.JS,
		nc:         cfg.NC,
		log:        cfg.Logger,
		auth:       cfg.Auth,
		maxMembers: cfg.MaxMembers,
		replicas:   cfg.Replicas,
		retention:  cfg.Retention,
		now:        time.Now,
	}
	for i := range s.stripes {
		s.stripes[i] = make(chan struct{}, 1)
	}
	return s, nil
}

// Setup creates or updates the groups bucket (stream KV_groups). It is
// idempotent. The bucket is a standard KV bucket (History 1) whose stream
// additionally allows atomic batch publishes and per-message TTLs, which
// membership changes use.
func (s *Service) Setup(ctx context.Context) error {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	cfg := jetstream.StreamConfig{
		Name:               kvStream,
		Description:        "groups: meta, memberships and per-user reverse index",
		Subjects:           []string{kvPrefix + ">"},
		MaxMsgsPerSubject:  1,
		MaxBytes:           -1,
		MaxMsgSize:         -1,
		MaxMsgs:            -1,
		MaxConsumers:       -1,
		Storage:            jetstream.FileStorage,
		Replicas:           s.replicas,
		AllowRollup:        true,
		DenyDelete:         true,
		Duplicates:         2 * time.Minute,
		AllowDirect:        true,
		Discard:            jetstream.DiscardNew,
		AllowMsgTTL:        true,
		AllowAtomicPublish: true,
	}
	if _, err := s.js.CreateOrUpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("groups: setup stream %s: %w", kvStream, err)
	}
	return nil
}

// withTimeout bounds ctx by opTimeout unless it already has a deadline.
func withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, opTimeout)
}

// newUUID returns a random UUID version 4 string.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	const hex = "0123456789abcdef"
	out := make([]byte, 36)
	j := 0
	for i, c := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out[j] = '-'
			j++
		}
		out[j], out[j+1] = hex[c>>4], hex[c&0x0f]
		j += 2
	}
	return string(out)
}
