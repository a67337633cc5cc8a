package delivery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/vartalap/vartalap/schema"
)

// BucketNodes is the memory KV bucket of node heartbeats (key = node id). It
// is separate from BucketPresence so node keys never collide with user tokens.
const BucketNodes = "nodes"

// WebSocket close codes a Sink is asked to close with.
const (
	CloseGoingAway    = 1001 // the server is shutting down
	CloseSlowConsumer = 1013 // the connection's outbound queue was full
	CloseLoggedOut    = 4001 // the device logged out or its access key was replaced
	CloseReplaced     = 4002 // a newer connection of the same device took over
)

// Kick reasons (the "reason" of a payload on schema.Kick).
const (
	KickReplaced    = "replaced"
	KickLogout      = "logout"
	KickKeyReplaced = "key_replaced"
)

// Errors callers branch on.
var (
	// ErrNotRunning is returned by Open when Run is not (or no longer) running.
	ErrNotRunning = errors.New("delivery not running")
	// ErrNotSetup is returned when neither Setup nor Run has bound the assets.
	ErrNotSetup = errors.New("delivery assets not set up")
)

// Config configures a Service.
type Config struct {
	// JS is the JetStream context. Required.
	JS jetstream.JetStream
	// NC is the connection for core subscriptions and publishes. Default: JS.Conn().
	NC *nats.Conn
	// Logger receives the service's logs. Default: discard.
	Logger *slog.Logger
	// Node is this process's id in presence: 1 to 64 of [A-Za-z0-9_-].
	// Default: hostname + "-" + pid (other characters become "_").
	Node string
	// Retention is the INBOX MaxAge: how long an unacked message is kept.
	// Default: 30 days.
	Retention time.Duration
	// MaxPerUser is the INBOX MaxMsgsPerSubject. A full inbox rejects new
	// messages (DiscardNew per subject); it never evicts unread mail.
	// Default: 10000.
	MaxPerUser int64
	// Replicas of the stream and buckets. Default: 1.
	Replicas int
	// AckTimeout: a message delivered to a connected device and not acked
	// within it is sent again. Default: 30s.
	AckTimeout time.Duration
	// MaxInFlight is the number of unacked messages per device before sending
	// pauses. Default: 256.
	MaxInFlight int
	// DeviceIdle: a device whose cursor has not been written for this long
	// (no connection, no ack) no longer holds back purges of its user's
	// inbox, so an abandoned phone does not fill the inbox for the devices
	// in use; if it returns it gets what is still stored. Default: 14 days;
	// negative: devices never go idle.
	DeviceIdle time.Duration
	// CursorFlush is how often a dirty cursor is written while a session runs
	// (and always when it ends). A crash loses at most this much of a
	// device's acks: those messages are delivered again. Default: 1s.
	CursorFlush time.Duration
	// Groups gives the memberships of a user (package groups). Default nil:
	// sessions deliver no GROUP_LOG messages.
	Groups Memberships
	// MaxPerGroup is the GROUP_LOG MaxMsgsPerSubject: the newest messages
	// of a group kept for members who have not read them (older ones are
	// discarded; MaxAge is Retention). Default: 100000.
	MaxPerGroup int64
	// Metrics registers the service's Prometheus collectors
	// (vartalap_delivery_*). Default nil: they count but are not
	// registered. New fails if they cannot be registered (e.g. twice).
	Metrics prometheus.Registerer
}

// Memberships is what delivery needs from the groups service.
type Memberships interface {
	// Memberships returns the groups u is or was a member of, with the
	// GROUP_LOG sequences of each membership (see schema.Membership).
	Memberships(ctx context.Context, u schema.UserID) ([]schema.Membership, error)
}

// Service owns the INBOX and GROUP_LOG streams, the cursors, presence and nodes buckets, and
// the delivery sessions of this process. Create it with New, call Setup, run
// Run, then Open sessions.
type Service struct {
	cfg     Config
	log     *slog.Logger
	js      jetstream.JetStream
	nc      *nats.Conn
	metrics *metrics

	// Knobs with fixed production values; tests in this package change them
	// between New and Setup/Run.
	nodeTTL       time.Duration // nodes bucket TTL
	heartbeat     time.Duration // node heartbeat period
	liveBuffer    int           // shared live channel capacity
	queueMsgs     int           // per-session live queue bound (messages)
	queueBytes    int           // per-session live queue bound (bytes)
	dropSweep     time.Duration // how often subscriptions are checked for dropped messages
	opTimeout     time.Duration // timeout of one NATS operation
	closeTimeout  time.Duration // bound on a session's final flush
	purgeEvery    time.Duration // how often a running session purges acked mail
	purgeAcks     int           // acks since the last purge that make the next flush purge anyway
	purgeSlots    chan struct{} // purges running at once on this node (see tryPurge)
	purgeRate     *rate.Limiter // session purges started per second on this node
	warnRate      *rate.Limiter // sessions' warnings logged per second (see warn)
	warnsDropped  atomic.Int64  // warnings left out since the last one logged
	maxAckPending int           // acks queued for a session before extra ones are dropped
	laggingHigh   int64         // lagging sessions at which Overloaded reports true
	recentMembers int           // sessions of a group here that make it keep its latest messages

	lagging    atomic.Int64 // sessions catching up after losing live messages (Session.lagging)
	recentPool recentPool   // batches read from groups' latest messages (see recent)
	// lateUntil: until when (UnixNano) the node counts as overloaded
	// because a session handed out a live group message that had waited
	// over liveAgeHigh in its queue (see noteWait).
	lateUntil   atomic.Int64
	liveAgeHigh time.Duration // see LiveAgeHigh
	lateFor     time.Duration // see lateFor

	assets atomic.Pointer[assets]

	up chan struct{} // closed once Run accepts sessions

	mu      sync.RWMutex
	started bool
	running bool
	runCtx  context.Context
	liveCh  chan *nats.Msg
	users   map[schema.UserID]*subs // live subscriptions of users with sessions here
	groups  map[schema.GroupID]*subs
	bySubj  map[string]*subs
	// reconnects is the NATS connection's reconnect count at the last
	// sweep (see sweepDrops).
	reconnects uint64
	wg         sync.WaitGroup // session goroutines
}

type assets struct {
	inbox    jetstream.Stream
	cursors  jetstream.KeyValue
	presence jetstream.KeyValue
	nodes    jetstream.KeyValue
}

// subs is the one live subscription of a user (or a group) on this node
// and the sessions here that receive it: the user's, or those of the
// group's members.
type subs struct {
	sub      *nats.Subscription
	sessions []*Session
	dropped  int
	group    bool // a group's: its messages are decoded once for all sessions
	// recent: a group's latest live messages, once it has recentMembers
	// sessions here (set under Service.mu, then kept while subscribed).
	recent *recent
}

// New validates cfg, fills defaults and returns a Service.
func New(cfg Config) (*Service, error) {
	if cfg.JS == nil {
		return nil, errors.New("delivery: config: JS is required")
	}
	if cfg.NC == nil {
		cfg.NC = cfg.JS.Conn()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Node == "" {
		cfg.Node = defaultNode()
	}
	if !schema.ValidNode(cfg.Node) {
		return nil, fmt.Errorf("delivery: config: invalid node id %q", cfg.Node)
	}
	if cfg.Retention == 0 {
		cfg.Retention = 30 * 24 * time.Hour
	}
	if cfg.MaxPerUser == 0 {
		cfg.MaxPerUser = 10000
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = 30 * time.Second
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = 256
	}
	if cfg.CursorFlush == 0 {
		cfg.CursorFlush = time.Second
	}
	if cfg.MaxPerGroup == 0 {
		cfg.MaxPerGroup = 100000
	}
	if cfg.DeviceIdle == 0 {
		cfg.DeviceIdle = 14 * 24 * time.Hour
	}
	switch {
	case cfg.Retention < 0:
		return nil, errors.New("delivery: config: negative Retention")
	case cfg.MaxPerUser < 0:
		return nil, errors.New("delivery: config: negative MaxPerUser")
	case cfg.MaxPerGroup < 0:
		return nil, errors.New("delivery: config: negative MaxPerGroup")
	case cfg.Replicas < 0 || cfg.Replicas > 5:
		return nil, errors.New("delivery: config: Replicas must be 1 to 5")
	case cfg.AckTimeout < 0:
		return nil, errors.New("delivery: config: negative AckTimeout")
	case cfg.MaxInFlight < 0:
		return nil, errors.New("delivery: config: negative MaxInFlight")
	case cfg.CursorFlush < 0:
		return nil, errors.New("delivery: config: negative CursorFlush")
	}
	m, err := newMetrics(cfg.Metrics)
	if err != nil {
		return nil, fmt.Errorf("delivery: %w", err)
	}
	s := &Service{
		up:            make(chan struct{}),
		cfg:           cfg,
		log:           cfg.Logger,
		js:            cfg.JS,
		nc:            cfg.NC,
		metrics:       m,
		nodeTTL:       30 * time.Second,
		heartbeat:     10 * time.Second,
		liveBuffer:    65536,
		queueMsgs:     max(64, cfg.MaxInFlight),
		queueBytes:    1 << 20,
		dropSweep:     2 * time.Second,
		opTimeout:     10 * time.Second,
		closeTimeout:  5 * time.Second,
		purgeEvery:    time.Minute,
		purgeAcks:     1000,
		purgeSlots:    make(chan struct{}, purgeConcurrency),
		purgeRate:     rate.NewLimiter(purgesPerSecond, 1),
		warnRate:      rate.NewLimiter(sessionWarnsPerSecond, sessionWarnsBurst),
		maxAckPending: 4 * cfg.MaxInFlight,
		laggingHigh:   LaggingHigh,
		recentMembers: recentMembers,
		liveAgeHigh:   LiveAgeHigh,
		lateFor:       lateFor,
		users:         make(map[schema.UserID]*subs),
		groups:        make(map[schema.GroupID]*subs),
		bySubj:        make(map[string]*subs),
	}
	return s, nil
}

func defaultNode() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		h = "node"
	}
	b := []byte(h)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	pid := "-" + strconv.Itoa(os.Getpid())
	if len(b)+len(pid) > 64 {
		b = b[:64-len(pid)]
	}
	return string(b) + pid
}

// Node returns this process's node id.
func (s *Service) Node() string { return s.cfg.Node }

// Setup creates or updates the INBOX and GROUP_LOG streams and the
// cursors, presence and nodes buckets. It is idempotent.
func (s *Service) Setup(ctx context.Context) error {
	stream, err := s.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:                 schema.StreamInbox,
		Description:          "per-user durable inbox (owned by delivery)",
		Subjects:             []string{schema.SubjectInboxAll},
		Retention:            jetstream.LimitsPolicy,
		Storage:              jetstream.FileStorage,
		MaxAge:               s.cfg.Retention,
		MaxMsgsPerSubject:    s.cfg.MaxPerUser,
		Discard:              jetstream.DiscardNew,
		DiscardNewPerSubject: true,
		AllowDirect:          true,
		AllowAtomicPublish:   true,
		Duplicates:           2 * time.Minute,
		RePublish: &jetstream.RePublish{
			Source:      schema.SubjectInboxAll,
			Destination: schema.SubjectDeliverRepub,
		},
		MaxConsumers: 64,
		Replicas:     s.cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("create stream %s: %w", schema.StreamInbox, err)
	}
	if _, err := s.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:               schema.StreamGroupLog,
		Description:        "group messages, each stored once (owned by delivery)",
		Subjects:           []string{schema.SubjectGroupLogAll},
		Retention:          jetstream.LimitsPolicy,
		Storage:            jetstream.FileStorage,
		MaxAge:             s.cfg.Retention,
		MaxMsgsPerSubject:  s.cfg.MaxPerGroup,
		Discard:            jetstream.DiscardOld,
		AllowDirect:        true,
		AllowAtomicPublish: true,
		Duplicates:         2 * time.Minute,
		RePublish: &jetstream.RePublish{
			Source:      schema.SubjectGroupLogAll,
			Destination: schema.SubjectDeliverGroupRepub,
		},
		MaxConsumers: 64,
		Replicas:     s.cfg.Replicas,
	}); err != nil {
		return fmt.Errorf("create stream %s: %w", schema.StreamGroupLog, err)
	}
	cursors, err := s.cursorBucket(ctx)
	if err != nil {
		return fmt.Errorf("create bucket %s: %w", schema.BucketCursors, err)
	}
	presence, err := s.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      schema.BucketPresence,
		Description: "online devices per user (owned by delivery)",
		History:     1,
		Storage:     jetstream.MemoryStorage,
		Replicas:    s.cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("create bucket %s: %w", schema.BucketPresence, err)
	}
	nodes, err := s.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketNodes,
		Description: "delivery node heartbeats (owned by delivery)",
		History:     1,
		TTL:         s.nodeTTL,
		Storage:     jetstream.MemoryStorage,
		Replicas:    s.cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("create bucket %s: %w", BucketNodes, err)
	}
	s.assets.Store(&assets{inbox: stream, cursors: cursors, presence: presence, nodes: nodes})
	return nil
}

// bind looks the assets up when Setup was not called in this process.
func (s *Service) bind(ctx context.Context) (*assets, error) {
	if a := s.assets.Load(); a != nil {
		return a, nil
	}
	stream, err := s.js.Stream(ctx, schema.StreamInbox)
	if err != nil {
		return nil, fmt.Errorf("bind stream %s: %w", schema.StreamInbox, err)
	}
	a := &assets{inbox: stream}
	for _, b := range []struct {
		name string
		kv   *jetstream.KeyValue
	}{{schema.BucketCursors, &a.cursors}, {schema.BucketPresence, &a.presence}, {BucketNodes, &a.nodes}} {
		kv, err := s.js.KeyValue(ctx, b.name)
		if err != nil {
			return nil, fmt.Errorf("bind bucket %s: %w", b.name, err)
		}
		*b.kv = kv
	}
	s.assets.CompareAndSwap(nil, a)
	return s.assets.Load(), nil
}

func (s *Service) getAssets() (*assets, error) {
	a := s.assets.Load()
	if a == nil {
		return nil, ErrNotSetup
	}
	return a, nil
}

// Run starts the live dispatcher, the kick subscription and the node
// heartbeat, and blocks until ctx ends. It then closes every session
// (CloseGoingAway, flushing cursors), removes this node's heartbeat and
// returns nil. Run may be called once.
func (s *Service) Run(ctx context.Context) error {
	a, err := s.bind(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		return errors.New("delivery: Run called twice")
	}
	s.started = true
	s.mu.Unlock()

	kickCh := make(chan *nats.Msg, 256)
	kickSub, err := s.nc.ChanSubscribe(schema.SubjectKickAll, kickCh)
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", schema.SubjectKickAll, err)
	}
	defer func() { _ = kickSub.Unsubscribe() }()
	s.beat(ctx, a)

	liveCh := make(chan *nats.Msg, s.liveBuffer)
	s.mu.Lock()
	s.liveCh = liveCh
	s.runCtx = ctx
	s.running = true
	s.mu.Unlock()
	close(s.up)

	dctx, stopDispatch := context.WithCancel(context.Background())
	var dwg sync.WaitGroup
	dwg.Add(1)
	go func() {
		defer dwg.Done()
		s.dispatch(dctx, liveCh)
	}()

	hb := time.NewTicker(s.heartbeat)
	defer hb.Stop()
	sweep := time.NewTicker(s.dropSweep)
	defer sweep.Stop()
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case m := <-kickCh:
			s.handleKick(ctx, m)
		case <-hb.C:
			s.beat(ctx, a)
		case <-sweep.C:
			s.sweepDrops()
		}
	}

	// Drain: no new sessions, close the open ones and wait for their flushes.
	_ = kickSub.Unsubscribe()
	s.mu.Lock()
	s.running = false
	var open []*Session
	for _, u := range s.users {
		open = append(open, u.sessions...)
	}
	s.mu.Unlock()
	for _, ss := range open {
		ss.terminate(CloseGoingAway, "server shutting down")
	}
	s.wg.Wait()
	stopDispatch()
	dwg.Wait()

	dctx2, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.closeTimeout)
	defer cancel()
	if err := a.nodes.Delete(dctx2, s.cfg.Node); err != nil {
		s.log.Warn("remove node heartbeat", "node", s.cfg.Node, "err", err)
	}
	return nil
}

// beat writes this node's heartbeat.
func (s *Service) beat(ctx context.Context, a *assets) {
	ctx, cancel := context.WithTimeout(ctx, s.opTimeout)
	defer cancel()
	v := strconv.AppendInt(nil, time.Now().UnixMilli(), 10)
	if _, err := a.nodes.Put(ctx, s.cfg.Node, v); err != nil && ctx.Err() == nil {
		s.log.Warn("node heartbeat", "node", s.cfg.Node, "err", err)
	}
}

// inlineBacklog is the number of live messages waiting for the dispatcher
// above which it hands every message to the sessions' workers instead of
// delivering to idle sessions itself: delivering inline saves a goroutine
// start per session (latency), workers run in parallel (throughput). With
// inline delivery alone, 1:1 messages flat out peaked at 12,000/s.
const inlineBacklog = 32

// dispatch routes live messages from the shared channel to the sessions of
// their user. It never blocks on a session.
func (s *Service) dispatch(ctx context.Context, ch <-chan *nats.Msg) {
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-ch:
			s.observeLag(m)
			seqs := readLiveSeq(m.Header)
			s.mu.RLock()
			if u := s.bySubj[m.Subject]; u != nil {
				var dec *schema.Message
				if u.group && len(u.sessions) > 1 {
					// One decode for every member here (nil if it fails:
					// each session then skips it as poison).
					dec, _ = schema.UnmarshalProto(m.Data)
				}
				// Deliver on this goroutine (see Session.push) unless live
				// messages are queueing up behind it: then the sessions'
				// workers share the work over the cores.
				if u.recent != nil {
					u.recent.add(m, dec, seqs) // before the sessions see it (see Session.fillRecent)
				}
				now, inline := time.Now(), len(ch) < inlineBacklog
				for _, ss := range u.sessions {
					ss.push(m, dec, seqs, now, inline)
				}
			}
			s.mu.RUnlock()
		}
	}
}

// observeLag records how long after its storage a republished message
// reached the dispatcher (vartalap_delivery_live_lag_seconds). Ephemeral
// messages, never stored, carry no storage time.
func (s *Service) observeLag(m *nats.Msg) {
	v := m.Header[schema.HeaderStoredAt]
	if len(v) == 0 {
		return
	}
	if t, err := time.Parse(time.RFC3339Nano, v[0]); err == nil {
		s.metrics.liveLag.Observe(max(time.Since(t), 0).Seconds())
	}
}

// sweepDrops finds live subscriptions whose messages the client library
// dropped (shared channel full) and makes their sessions re-read the
// stream; after a reconnect of the NATS connection (live messages sent
// meanwhile are lost, and a quiet subject would show no gap until its next
// message) every session re-reads.
func (s *Service) sweepDrops() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.nc.Stats().Reconnects; n != s.reconnects {
		s.reconnects = n
		for _, u := range s.users {
			for _, ss := range u.sessions {
				ss.markGap()
			}
		}
		return
	}
	for _, u := range s.bySubj {
		n, err := u.sub.Dropped()
		if err != nil || n == u.dropped {
			continue
		}
		u.dropped = n
		for _, ss := range u.sessions {
			ss.markGap()
		}
	}
}

// kickMsg is the payload on schema.Kick. On "replaced" kicks Session is the
// new session, Node its node (which ignores its own kick: it closed its old
// session already) and Rev the revision of the new session's presence write.
// Presence revisions order the sessions of a user across nodes, so a kick
// that arrives late never closes a session opened after the kicking one.
type kickMsg struct {
	Reason  string `json:"reason"`
	Session string `json:"session,omitempty"`
	Node    string `json:"node,omitempty"`
	Rev     uint64 `json:"rev,omitempty"`
}

func (s *Service) handleKick(ctx context.Context, m *nats.Msg) {
	parts := strings.Split(m.Subject, ".")
	if len(parts) != 4 {
		return
	}
	u, err1 := schema.ParseToken(parts[2])
	d, err2 := schema.ParseToken(parts[3])
	user, device := schema.UserID(u), schema.DeviceID(d)
	if err1 != nil || err2 != nil || !user.Valid() || !device.Valid() {
		s.log.Warn("bad kick subject", "subject", m.Subject)
		return
	}
	var k kickMsg
	if err := json.Unmarshal(m.Data, &k); err != nil {
		s.log.Warn("bad kick payload", "subject", m.Subject, "err", err)
		return
	}
	switch k.Reason {
	case KickReplaced:
		if k.Node == s.cfg.Node {
			return
		}
		for _, ss := range s.local(user, device) {
			rev := ss.rev.Load() // 0: still opening, so newer than the kicker
			if ss.id != k.Session && rev != 0 && (k.Rev == 0 || rev < k.Rev) {
				ss.terminate(CloseReplaced, "replaced by a newer connection")
			}
		}
	case KickLogout, KickKeyReplaced:
		reason := "logged out"
		if k.Reason == KickKeyReplaced {
			reason = "key replaced"
		}
		for _, ss := range s.local(user, device) {
			ss.terminate(CloseLoggedOut, reason)
		}
		if k.Reason == KickLogout {
			ctx, cancel := context.WithTimeout(ctx, s.opTimeout)
			defer cancel()
			if err := s.ForgetDevice(ctx, user, device); err != nil {
				s.log.Error("forget device", "user", user, "device", device, "err", err)
			}
		}
	default:
		s.log.Warn("unknown kick reason", "subject", m.Subject, "reason", k.Reason)
	}
}

// local returns the sessions of (user, device) on this node.
func (s *Service) local(user schema.UserID, device schema.DeviceID) []*Session {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*Session
	if u := s.users[user]; u != nil {
		for _, ss := range u.sessions {
			if ss.device == device {
				out = append(out, ss)
			}
		}
	}
	return out
}

// LaggingHigh is the number of sessions catching up after losing live
// messages (their queue overflowed, or the node's subscription dropped
// messages) at which a node counts as overloaded (see Overloaded). A
// session's queue holds 64 messages or more, so it overflows only when its
// worker did not run for that many messages: the node, not the device, is
// slow. One device can be unlucky; dozens at once are a fan-out the node
// cannot keep up with.
const LaggingHigh = 32

// LiveAgeHigh is how long a live group message may wait in a session's
// queue (from the dispatcher to the device's connection) before the node
// counts as overloaded, for lateFor after. Normally it waits a few
// milliseconds. Half a second made the gate hold back a node that was
// keeping up, slowly, with 300 messages/s into a 1,000-member group
// (215,000 deliveries/s and p99 10–13 s, against 268,000/s and 2–3 s).
// Measured on this node's clock alone, so clocks that differ between nodes
// do not matter.
const LiveAgeHigh = time.Second

// lateFor is how long one late group message keeps the node overloaded:
// a node behind hands out late messages continuously.
const lateFor = 250 * time.Millisecond

// noteWait records that a session handed out a live group message at now
// after it waited d in its queue: over liveAgeHigh, the node is behind
// (see Overloaded).
func (s *Service) noteWait(d time.Duration, now time.Time) {
	if d <= s.liveAgeHigh {
		return
	}
	// Stored rarely (a thousand members' sessions note the same late
	// message): once per lateFor/4.
	until := now.Add(s.lateFor).UnixNano()
	if until-s.lateUntil.Load() > int64(s.lateFor/4) {
		s.lateUntil.Store(until)
	}
}

// Overloaded reports whether this node is falling behind its live
// messages: a session handed out a live group message that had waited over
// LiveAgeHigh in its queue in the last lateFor, or LaggingHigh sessions or
// more are re-reading the streams after losing live messages. The gateway
// slows senders of group messages meanwhile: a 1,000-member group written
// to faster than the node can deliver would otherwise grow a backlog
// without bound, and members further behind than the group's latest
// messages in memory (see recent) re-read it from GROUP_LOG, twice the
// cost of the live fan-out. Cheap: two atomic loads.
func (s *Service) Overloaded() bool {
	return s.lagging.Load() >= s.laggingHigh || time.Now().UnixNano() < s.lateUntil.Load()
}

// Sessions' warnings (a failed stream read, cursor write or purge) are
// logged at most this often: under load a thousand sessions fail the same
// way at once, and a log line each per second buried the rest.
const (
	sessionWarnsPerSecond = 10
	sessionWarnsBurst     = 20
)

// warn logs a session's warning unless sessions have logged more than
// sessionWarnsPerSecond lately; the next one logged says how many were
// left out ("suppressed").
func (s *Service) warn(msg string, args ...any) {
	if !s.warnRate.Allow() {
		s.warnsDropped.Add(1)
		return
	}
	if n := s.warnsDropped.Swap(0); n > 0 {
		args = append(args, "suppressed", n)
	}
	s.log.Warn(msg, args...)
}

// Sessions returns the number of open sessions on this node.
func (s *Service) Sessions() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	n := 0
	for _, u := range s.users {
		n += len(u.sessions)
	}
	return n
}

// register adds ss to the user's sessions, subscribing the user's live
// subject if ss is the user's first session here. It returns the session of
// the same device it displaced, if any, and whether a subscription was made.
func (s *Service) register(ss *Session) (old *Session, subscribed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running {
		return nil, false, ErrNotRunning
	}
	u := s.users[ss.user]
	if u == nil {
		subj := schema.Deliver(ss.user)
		sub, err := s.nc.ChanSubscribe(subj, s.liveCh)
		if err != nil {
			return nil, false, fmt.Errorf("subscribe %s: %w", subj, err)
		}
		u = &subs{sub: sub}
		s.users[ss.user] = u
		s.bySubj[subj] = u
		subscribed = true
	}
	for i, o := range u.sessions {
		if o.device == ss.device {
			old = o
			u.sessions = slices.Delete(u.sessions, i, i+1)
			break
		}
	}
	u.sessions = append(u.sessions, ss)
	ss.ctx = s.runCtx
	s.wg.Add(1)
	return old, subscribed, nil
}

// unregister removes ss and drops the user's subscription with the last
// session.
func (s *Service) unregister(ss *Session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.users[ss.user]
	if u == nil {
		return
	}
	if i := slices.Index(u.sessions, ss); i >= 0 {
		u.sessions = slices.Delete(u.sessions, i, i+1)
	}
	if len(u.sessions) == 0 {
		if err := u.sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			s.log.Warn("unsubscribe live", "user", ss.user, "err", err)
		}
		delete(s.users, ss.user)
		delete(s.bySubj, u.sub.Subject)
	}
}

// joinGroup adds ss to the sessions receiving group g's live messages,
// subscribing its live subject if ss is the first here.
func (s *Service) joinGroup(ss *Session, g schema.GroupID) error {
	s.mu.Lock()
	u := s.groups[g]
	subscribed := false
	if u == nil {
		subj := schema.DeliverGroup(g)
		sub, err := s.nc.ChanSubscribe(subj, s.liveCh)
		if err != nil {
			s.mu.Unlock()
			return fmt.Errorf("subscribe %s: %w", subj, err)
		}
		u = &subs{sub: sub, group: true}
		s.groups[g] = u
		s.bySubj[subj] = u
		subscribed = true
	}
	u.sessions = append(u.sessions, ss)
	if u.recent == nil && len(u.sessions) >= s.recentMembers {
		u.recent = &recent{}
	}
	s.mu.Unlock()
	if subscribed && s.nc != s.js.Conn() {
		// The catch-up read goes over another connection: make sure the
		// subscription is active before it. (Failing that, the read
		// still finds what the subscription missed; live ones after it
		// show as gaps.)
		ctx, cancel := context.WithTimeout(ss.ctx, s.opTimeout)
		if err := s.nc.FlushWithContext(ctx); err != nil {
			s.log.Warn("flush subscription", "group", g, "err", err)
		}
		cancel()
	}
	return nil
}

// recentOf returns group g's latest live messages on this node, or nil.
func (s *Service) recentOf(g schema.GroupID) *recent {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if u := s.groups[g]; u != nil {
		return u.recent
	}
	return nil
}

// leaveGroup removes ss from group g's sessions and drops the subscription
// with the last one.
func (s *Service) leaveGroup(ss *Session, g schema.GroupID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.groups[g]
	if u == nil {
		return
	}
	if i := slices.Index(u.sessions, ss); i >= 0 {
		u.sessions = slices.Delete(u.sessions, i, i+1)
	}
	if len(u.sessions) == 0 {
		if err := u.sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			s.log.Warn("unsubscribe live", "group", g, "err", err)
		}
		delete(s.groups, g)
		delete(s.bySubj, u.sub.Subject)
	}
}

// Started is closed once Run accepts sessions: Open fails with
// ErrNotRunning before that.
func (s *Service) Started() <-chan struct{} { return s.up }

// Open starts delivering user's inbox to device through sink: the backlog
// from the device's cursor in stream order, then live messages. A session of
// the same device on this node is closed (CloseReplaced) and its cursor
// flushed first; sessions on other nodes are kicked. Open returns
// ErrNotRunning when Run is not running.
func (s *Service) Open(ctx context.Context, user schema.UserID, device schema.DeviceID, sink Sink) (*Session, error) {
	if !user.Valid() || !device.Valid() {
		return nil, fmt.Errorf("open session: %w", schema.ErrInvalidID)
	}
	if sink == nil {
		return nil, errors.New("open session: nil sink")
	}
	a, err := s.getAssets()
	if err != nil {
		return nil, err
	}
	ss := newSession(s, user, device, sink)
	old, subscribed, err := s.register(ss)
	if err != nil {
		return nil, err
	}
	started := false
	defer func() {
		if !started {
			s.unregister(ss)
			close(ss.done)
			s.wg.Done()
		}
	}()
	if subscribed && s.nc != s.js.Conn() {
		// The catch-up read goes over another connection: make sure the
		// subscription is active before it.
		if err := s.nc.FlushWithContext(ctx); err != nil {
			return nil, fmt.Errorf("flush subscription: %w", err)
		}
	}
	if old != nil {
		old.terminate(CloseReplaced, "replaced by a newer connection")
		select {
		case <-old.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	cur, err := s.openCursor(ctx, a, user, device)
	if err != nil {
		return nil, err
	}
	rev, err := s.presenceAdd(ctx, a, ss)
	if err != nil {
		return nil, err
	}
	ss.rev.Store(rev)
	kick, _ := json.Marshal(kickMsg{Reason: KickReplaced, Session: ss.id, Node: s.cfg.Node, Rev: rev})
	if err := s.nc.Publish(schema.Kick(user, device), kick); err != nil {
		s.log.Warn("publish kick", "user", user, "device", device, "err", err)
	}
	ss.init(cur)
	started = true
	s.metrics.sessions.Inc() // finish decrements it
	ss.start()
	return ss, nil
}

// PublishEphemeral core-publishes m (protobuf) to the live subject of to.
// Sessions deliver it to every connected device of to without storing,
// tracking or redelivering it.
func (s *Service) PublishEphemeral(ctx context.Context, to schema.UserID, m *schema.Message) error {
	if !to.Valid() {
		return fmt.Errorf("publish ephemeral: %w", schema.ErrInvalidID)
	}
	if m == nil {
		return errors.New("publish ephemeral: nil message")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	subj := schema.Deliver(to)
	if err := s.nc.Publish(subj, m.MarshalProto()); err != nil {
		return fmt.Errorf("publish ephemeral to %s: %w", subj, err)
	}
	return nil
}

// cursorBucket creates (or binds) the cursors bucket. Its stream is made
// here rather than by CreateKeyValue so that a single-replica deployment can
// use PersistMode async for it: cursor writes are the most frequent writes
// of a busy server, and with sync: always each would be an fsync of its own.
// Losing the last cursor writes to an OS crash only re-delivers messages a
// device had acked (at-least-once; clients de-duplicate by id); no message is
// lost, because the INBOX itself stays fsynced and purges follow cursors.
// The persist mode cannot change after creation, so an existing bucket is
// bound as it is.
func (s *Service) cursorBucket(ctx context.Context) (jetstream.KeyValue, error) {
	if kv, err := s.js.KeyValue(ctx, schema.BucketCursors); err == nil {
		return kv, nil
	} else if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, err
	}
	cfg := jetstream.StreamConfig{
		Name:              "KV_" + schema.BucketCursors,
		Description:       "per-user device ack cursors (owned by delivery)",
		Subjects:          []string{"$KV." + schema.BucketCursors + ".>"},
		MaxMsgsPerSubject: 1,
		MaxMsgs:           -1,
		MaxBytes:          -1,
		MaxConsumers:      -1,
		Discard:           jetstream.DiscardNew,
		AllowRollup:       true,
		DenyDelete:        true,
		AllowDirect:       true,
		Duplicates:        2 * time.Minute,
		Storage:           jetstream.FileStorage,
		Replicas:          s.cfg.Replicas,
	}
	if s.cfg.Replicas <= 1 {
		cfg.PersistMode = jetstream.AsyncPersistMode
	}
	if _, err := s.js.CreateStream(ctx, cfg); err != nil && !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return nil, err
	}
	return s.js.KeyValue(ctx, schema.BucketCursors)
}
