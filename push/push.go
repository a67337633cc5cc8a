package push

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/schema"
)

// Presence tells which devices of a user are connected.
type Presence interface {
	// Online returns the devices of user currently connected anywhere.
	Online(ctx context.Context, user schema.UserID) ([]schema.DeviceID, error)
}

// Device is one registered device of a user and its push token ("" = none).
type Device struct {
	ID    schema.DeviceID
	Token string
}

// Devices gives the devices and push tokens of a user.
type Devices interface {
	// Devices returns the registered devices of user.
	Devices(ctx context.Context, user schema.UserID) ([]Device, error)
	// RemoveToken removes the push token of (user, device) if it still
	// equals token.
	RemoveToken(ctx context.Context, user schema.UserID, device schema.DeviceID, token string) error
}

// MemberLister gives the members of a group (groups.Service and
// groups.Client have it). A missing group is an error; Config.IsNoGroup
// recognizes it.
type MemberLister interface {
	// Members returns the current members of group g.
	Members(ctx context.Context, g schema.GroupID) ([]schema.UserID, error)
}

// Notification is one push to one device token.
type Notification struct {
	Token       string
	Data        map[string]string // "message": rendered JSON, optional "count"
	CollapseKey string
	TTL         time.Duration
}

// Data keys of a Notification.
const (
	DataMessage = "message" // the JSON a text client receives for the latest message
	DataCount   = "count"   // number of messages folded into the push, when more than one
)

// Sender delivers notifications. Errors are classified with ErrTokenInvalid
// and *RetryableError; any other error is permanent for that notification.
type Sender interface {
	Send(ctx context.Context, n Notification) error
}

// ErrTokenInvalid is wrapped by a Sender when the provider reported the
// token as unregistered or invalid: the token is removed and never used
// again.
var ErrTokenInvalid = errors.New("push token invalid or unregistered")

// RetryableError is a transient provider failure (429, 5xx, timeout). After
// is the server's Retry-After, if any.
type RetryableError struct {
	After time.Duration
	Err   error
}

func (e *RetryableError) Error() string {
	if e.Err == nil {
		return "retryable push error"
	}
	return "retryable push error: " + e.Err.Error()
}

func (e *RetryableError) Unwrap() error { return e.Err }

// ConsumerName is the durable consumer on INBOX, and with Config.Groups the
// one on GROUP_LOG, shared by all push processes.
const ConsumerName = "push"

// Defaults.
const (
	DefaultTTL         = 24 * time.Hour
	DefaultConcurrency = 8
	DefaultCoalesce    = 2 * time.Second
	DefaultMaxAttempts = 5
)

const (
	// maxTTL is FCM's limit for android.ttl (28 days).
	maxTTL = 28 * 24 * time.Hour
	// ackWait is the consumer's ack wait; held messages are kept alive with
	// InProgress every ackWait/3.
	ackWait = 30 * time.Second
	// maxDeliver bounds the deliveries of one message to a push consumer.
	maxDeliver = 10
	// maxAckPendingPerWorker times Concurrency is each consumer's
	// MaxAckPending: the messages held in memory at most, per stream.
	maxAckPendingPerWorker = 128
	// opTimeout bounds one member, presence or device lookup and one token
	// removal.
	opTimeout = 10 * time.Second
	// sendTimeout bounds one Sender.Send attempt; running out is retryable.
	sendTimeout = 30 * time.Second
	// firstRetryDelay doubles per attempt up to maxRetryDelay.
	firstRetryDelay = 500 * time.Millisecond
	// maxRetryDelay caps the retry backoff; a Retry-After longer than this
	// makes the push give up.
	maxRetryDelay = 2 * time.Minute
	// maxNakDelay caps the redelivery delay after a lookup failure.
	maxNakDelay = 30 * time.Second
	// shutdownNakDelay is the redelivery delay of messages held at shutdown.
	shutdownNakDelay = time.Second
	// maxDeadTokens bounds the in-memory set of dropped tokens.
	maxDeadTokens = 4096
)

// Config configures a Service.
type Config struct {
	// JS is the JetStream context of the INBOX and GROUP_LOG streams.
	// Required.
	JS jetstream.JetStream
	// Logger receives the service's logs. Default: discard.
	Logger *slog.Logger
	// Presence tells which devices are connected. Required.
	Presence Presence
	// Devices gives device tokens and removes bad ones. Required.
	Devices Devices
	// Sender delivers the pushes (push/fcm, or NewLogSender). Required.
	Sender Sender
	// Groups lists the members of a group, for the group messages stored
	// once in GROUP_LOG. Default nil: GROUP_LOG is not consumed (no
	// consumer is created there) and only INBOX messages are pushed.
	Groups MemberLister
	// IsNoGroup reports whether an error of Groups.Members means the group
	// does not exist (e.g. errors.Is(err, groups.ErrNotFound)): its
	// messages are then acked and not pushed. Any other error, and every
	// error when IsNoGroup is nil, is retried by redelivery with backoff.
	// Context errors are always retried.
	IsNoGroup func(error) bool
	// TTL is how long the provider keeps an undelivered push, sent in whole
	// seconds (android.ttl). Default 24h, at most 28 days.
	TTL time.Duration
	// Concurrency is the number of lookup workers and of send workers.
	// Default 8.
	Concurrency int
	// Coalesce is the window per (user, device): at most one push per
	// window, folding the messages that arrive inside it. Default 2s.
	Coalesce time.Duration
	// MaxAttempts is the number of send attempts of one push on retryable
	// errors. Default 5.
	MaxAttempts int
	// Metrics registers the service's Prometheus collectors
	// (vartalap_push_*, the counters of Stats). Default nil: they are not
	// registered. New fails if they cannot be registered (e.g. twice).
	Metrics prometheus.Registerer
}

// Stats is a snapshot of the service's counters since New.
type Stats struct {
	Sent          uint64 // pushes the provider accepted
	Failed        uint64 // pushes given up: permanent error or attempts exhausted (invalid tokens excluded)
	Retried       uint64 // send attempts repeated after a retryable error
	Coalesced     uint64 // messages folded into another message's push (count-1 per push)
	TokensRemoved uint64 // tokens removed because the provider reported them invalid
}

// Service pushes stored messages to offline devices.
type Service struct {
	js          jetstream.JetStream
	log         *slog.Logger
	presence    Presence
	devices     Devices
	sender      Sender
	groups      MemberLister
	isNoGroup   func(error) bool
	ttl         time.Duration
	workers     int
	window      time.Duration
	maxAttempts int
	ackWait     time.Duration

	sent, failed, retried, coalesced, tokensRemoved atomic.Uint64
	// metrics are Prometheus views of the counters above.
	metrics *metrics

	deadMu sync.Mutex
	dead   map[string]struct{} // tokens reported invalid

	devMu    sync.Mutex
	devCache map[schema.UserID]cachedDevices // recent Devices answers
}

// cachedDevices is a user's devices as the profile service listed them.
type cachedDevices struct {
	devs []Device
	at   time.Time
}

// Device lists are cached briefly: every stored message is looked up, and a
// 1,000-member group message is 999 lookups. A token registered at login is
// therefore used at most devicesTTL later; a token FCM rejects is dropped at
// once (isDead).
const (
	devicesTTL       = 5 * time.Second
	devicesCacheSize = 100_000
)

// userDevices returns user's devices, from the cache when fresh; a lookup
// is bounded by opTimeout. The slice is shared: callers must not modify it.
// (A group message asks this once per member, so a hit allocates nothing.)
func (s *Service) userDevices(ctx context.Context, user schema.UserID) ([]Device, error) {
	now := time.Now()
	s.devMu.Lock()
	if e, ok := s.devCache[user]; ok && now.Sub(e.at) < devicesTTL {
		s.devMu.Unlock()
		return e.devs, nil
	}
	s.devMu.Unlock()
	lctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	devs, err := s.devices.Devices(lctx, user)
	if err != nil {
		return nil, err
	}
	s.devMu.Lock()
	if s.devCache == nil {
		s.devCache = make(map[schema.UserID]cachedDevices)
	}
	if len(s.devCache) >= devicesCacheSize {
		for k, e := range s.devCache {
			if now.Sub(e.at) >= devicesTTL {
				delete(s.devCache, k)
			}
		}
		if len(s.devCache) >= devicesCacheSize {
			clear(s.devCache)
		}
	}
	s.devCache[user] = cachedDevices{devs: slices.Clone(devs), at: now}
	s.devMu.Unlock()
	return devs, nil
}

// New returns a Service for cfg, with defaults filled in.
func New(cfg Config) (*Service, error) {
	switch {
	case cfg.JS == nil:
		return nil, errors.New("push: config: JS is required")
	case cfg.Presence == nil:
		return nil, errors.New("push: config: Presence is required")
	case cfg.Devices == nil:
		return nil, errors.New("push: config: Devices is required")
	case cfg.Sender == nil:
		return nil, errors.New("push: config: Sender is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = DefaultConcurrency
	}
	if cfg.Coalesce == 0 {
		cfg.Coalesce = DefaultCoalesce
	}
	if cfg.MaxAttempts == 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	}
	switch {
	case cfg.TTL < time.Second || cfg.TTL > maxTTL:
		return nil, fmt.Errorf("push: config: ttl %v not between 1s and %v", cfg.TTL, maxTTL)
	case cfg.Concurrency < 0:
		return nil, fmt.Errorf("push: config: concurrency %d is negative", cfg.Concurrency)
	case cfg.Coalesce < 0:
		return nil, fmt.Errorf("push: config: coalesce %v is negative", cfg.Coalesce)
	case cfg.MaxAttempts < 0:
		return nil, fmt.Errorf("push: config: max attempts %d is negative", cfg.MaxAttempts)
	}
	s := &Service{
		js:          cfg.JS,
		log:         cfg.Logger,
		presence:    cfg.Presence,
		devices:     cfg.Devices,
		sender:      cfg.Sender,
		groups:      cfg.Groups,
		isNoGroup:   cfg.IsNoGroup,
		ttl:         cfg.TTL.Truncate(time.Second),
		workers:     cfg.Concurrency,
		window:      cfg.Coalesce,
		maxAttempts: cfg.MaxAttempts,
		ackWait:     ackWait,
		dead:        make(map[string]struct{}),
	}
	m, err := newMetrics(cfg.Metrics, s)
	if err != nil {
		return nil, fmt.Errorf("push: %w", err)
	}
	s.metrics = m
	return s, nil
}

// Setup creates or updates the durable consumer on INBOX and, when
// Config.Groups is set, the one on GROUP_LOG. It is idempotent. The streams
// must exist (delivery creates them).
func (s *Service) Setup(ctx context.Context) error {
	for _, stream := range s.streams() {
		_, err := s.js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{
			Durable:       ConsumerName,
			Description:   "sends push notifications to offline devices",
			DeliverPolicy: jetstream.DeliverNewPolicy,
			AckPolicy:     jetstream.AckExplicitPolicy,
			AckWait:       s.ackWait,
			MaxDeliver:    maxDeliver,
			MaxAckPending: maxAckPendingPerWorker * s.workers,
		})
		if err != nil {
			return fmt.Errorf("create consumer %s on %s: %w", ConsumerName, stream, err)
		}
	}
	return nil
}

// streams are the streams the service consumes.
func (s *Service) streams() []string {
	if s.groups == nil {
		return []string{schema.StreamInbox}
	}
	return []string{schema.StreamInbox, schema.StreamGroupLog}
}

// Stats returns a snapshot of the counters.
func (s *Service) Stats() Stats {
	return Stats{
		Sent:          s.sent.Load(),
		Failed:        s.failed.Load(),
		Retried:       s.retried.Load(),
		Coalesced:     s.coalesced.Load(),
		TokensRemoved: s.tokensRemoved.Load(),
	}
}

// Run pushes messages until ctx ends. It then stops consuming, abandons the
// pushes in flight and NakWithDelay's the messages it held, so the next
// push process picks them up, and returns nil. Setup must have run before.
// Run returns an error if a consumer is missing or is deleted while
// running.
func (s *Service) Run(ctx context.Context) error {
	streams := s.streams()
	var conss []jetstream.Consumer
	for _, stream := range streams {
		cons, err := s.js.Consumer(ctx, stream, ConsumerName)
		if err != nil {
			return fmt.Errorf("push consumer on %s: %w", stream, err)
		}
		conss = append(conss, cons)
	}
	r := newRunner(s)
	// Both streams' messages share the lookup workers.
	in := make(chan jetstream.Msg, s.workers)
	stop := make(chan struct{})
	fatal := make(chan error, 1)
	var ccs []jetstream.ConsumeContext
	stopConsuming := func() {
		for _, cc := range ccs {
			cc.Stop()
		}
		for _, cc := range ccs {
			<-cc.Closed()
		}
	}
	for i, cons := range conss {
		stream := streams[i]
		cc, err := cons.Consume(func(m jetstream.Msg) {
			select {
			case in <- m:
			case <-stop:
			}
		},
			jetstream.PullMaxMessages(2*s.workers),
			jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
				if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
					select {
					case fatal <- fmt.Errorf("%s: %w", stream, err):
					default:
					}
					return
				}
				s.log.Warn("push consume error", "stream", stream, "err", err)
			}))
		if err != nil {
			close(stop)
			stopConsuming()
			r.releaseAll(in)
			return fmt.Errorf("consume %s: %w", stream, err)
		}
		ccs = append(ccs, cc)
	}

	wctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range s.workers {
		wg.Go(func() { r.lookupLoop(wctx, in) })
		wg.Go(func() { r.sendLoop(wctx) })
	}
	wg.Go(func() { r.flushLoop(wctx) })
	wg.Go(func() { r.keepAlive(wctx) })

	var runErr error
	select {
	case <-ctx.Done():
	case err := <-fatal:
		runErr = fmt.Errorf("push consumer: %w", err)
	}
	close(stop)
	stopConsuming()
	cancel()
	wg.Wait()
	r.releaseAll(in)
	return runErr
}

func (s *Service) isDead(token string) bool {
	s.deadMu.Lock()
	defer s.deadMu.Unlock()
	_, ok := s.dead[token]
	return ok
}

func (s *Service) markDead(token string) {
	s.deadMu.Lock()
	defer s.deadMu.Unlock()
	if len(s.dead) >= maxDeadTokens {
		clear(s.dead)
	}
	s.dead[token] = struct{}{}
}
