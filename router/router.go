package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/schema"
)

// MemberLister is what the router needs from the groups service.
type MemberLister interface {
	// Members returns the current members of group g; ErrNoGroup (wrapped)
	// if it does not exist.
	Members(ctx context.Context, g schema.GroupID) ([]schema.UserID, error)
}

// ErrNoGroup is returned (wrapped) by a MemberLister for a group that does
// not exist.
var ErrNoGroup = errors.New("no such group")

// Names of the assets the router owns.
const (
	// ConsumerName is the durable pull consumer on CHAT_IN shared by all
	// router processes.
	ConsumerName = "router"
	// QueueGroup is the core queue group of the msg.live.* subscription.
	QueueGroup = "router"
)

// Defaults.
const (
	DefaultBatch           = 256
	DefaultMaxMessageBytes = 1<<20 + 64<<10
	DefaultReplicas        = 1
	DefaultMaxBacklogBytes = 1 << 30
)

const (
	// maxAtomicBatch is the server's limit of messages in one atomic batch.
	maxAtomicBatch = 1000
	// smallBatch is the most copies published pipelined (all sent, then
	// every PubAck awaited) rather than as an atomic batch (see store).
	// Measured alone under sync: always on a 2-core VM, per round: 4
	// copies 0.7 ms pipelined, 2.4 ms atomic, 0.9 ms one by one; 8 copies
	// 1.5 / 2.3 / 2.6 ms; 16 copies 2.9 / 2.6 / 4.4 ms. Under the direct
	// benchmark's load a limit of 12 was no better than 4 (each pipelined
	// copy is an fsync of its own), so the limit stays low.
	smallBatch = 4
	// maxDeliver bounds the deliveries of one CHAT_IN message.
	maxDeliver = 10
	// ackWait is the consumer's ack wait (the first BackOff step).
	ackWait = 15 * time.Second
	// maxRetryDelay caps the NakWithDelay backoff. It stays well below the
	// INBOX and GROUP_LOG duplicate windows (2 minutes), so a retry de-duplicates the copies
	// an earlier attempt stored.
	maxRetryDelay = time.Minute
	// opTimeout bounds one membership lookup or one publish round.
	opTimeout = 10 * time.Second
	// fetchWait is how long one fetch waits for the first message; it
	// bounds how long Run takes to notice ctx's end.
	fetchWait = 500 * time.Millisecond
	// purgeEvery is how often routed messages are purged from CHAT_IN.
	purgeEvery = 250 * time.Millisecond
	// maxChatInAge bounds CHAT_IN should the router be gone for good.
	maxChatInAge = 14 * 24 * time.Hour
	// liveBuffer is the number of ephemeral messages buffered before the
	// msg.live.* subscription drops (ephemeral messages may be dropped).
	liveBuffer = 1024
)

// backOff is the redelivery schedule for messages whose ack wait expired
// (a router that died or stalled mid-batch). The server takes AckWait from
// its first element.
var backOff = []time.Duration{ackWait, 30 * time.Second, 45 * time.Second, time.Minute}

// Config configures a Router.
type Config struct {
	// JS is the JetStream context used for CHAT_IN, INBOX and GROUP_LOG.
	// Required.
	JS jetstream.JetStream
	// NC is the connection for the msg.live.* subscription and live
	// (deliver.user.*) publishes. Default: JS.Conn().
	NC *nats.Conn
	// Logger receives the router's logs. Default: discard.
	Logger *slog.Logger
	// Groups resolves group membership. Default nil: group messages get an
	// "unknown_group" error notice.
	Groups MemberLister
	// Batch is the number of CHAT_IN messages fetched and routed together.
	// Default 256.
	Batch int
	// MaxMessageBytes is CHAT_IN's MaxMsgSize. Default and minimum
	// 1 MiB + 64 KiB: a gateway batch (up to 1 MiB of client messages)
	// must fit.
	MaxMessageBytes int32
	// Replicas is CHAT_IN's replica count. Default 1.
	Replicas int
	// MaxBacklogBytes bounds CHAT_IN: accepted messages not yet routed.
	// Past it, new messages are refused (the client is told to resend).
	// Default 1 GiB.
	MaxBacklogBytes int64
	// Metrics registers the router's Prometheus collectors
	// (vartalap_router_*). Default nil: they count but are not registered.
	// New fails if they cannot be registered (e.g. registered twice).
	Metrics prometheus.Registerer
}

// Router routes CHAT_IN messages into INBOX (direct messages, notices) and
// GROUP_LOG (group messages, once each), and ephemeral messages to live
// subscribers.
type Router struct {
	js         jetstream.JetStream
	nc         *nats.Conn
	log        *slog.Logger
	groups     MemberLister
	batch      int
	maxMsg     int32
	repl       int
	maxBacklog int64
	metrics    *metrics
}

// New returns a Router for cfg, with defaults filled in.
func New(cfg Config) (*Router, error) {
	if cfg.JS == nil {
		return nil, errors.New("router: config: JS is required")
	}
	if cfg.NC == nil {
		cfg.NC = cfg.JS.Conn()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Batch == 0 {
		cfg.Batch = DefaultBatch
	}
	if cfg.MaxMessageBytes == 0 {
		cfg.MaxMessageBytes = DefaultMaxMessageBytes
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = DefaultReplicas
	}
	if cfg.MaxBacklogBytes == 0 {
		cfg.MaxBacklogBytes = DefaultMaxBacklogBytes
	}
	switch {
	case cfg.MaxBacklogBytes < 0:
		return nil, fmt.Errorf("router: config: max backlog %d is negative", cfg.MaxBacklogBytes)
	case cfg.Batch < 0:
		return nil, fmt.Errorf("router: config: batch %d is negative", cfg.Batch)
	case cfg.MaxMessageBytes < DefaultMaxMessageBytes:
		return nil, fmt.Errorf("router: config: max message bytes %d is below %d (a gateway batch)", cfg.MaxMessageBytes, DefaultMaxMessageBytes)
	case cfg.Replicas < 0:
		return nil, fmt.Errorf("router: config: replicas %d is negative", cfg.Replicas)
	}
	m, err := newMetrics(cfg.Metrics)
	if err != nil {
		return nil, fmt.Errorf("router: %w", err)
	}
	return &Router{
		js:         cfg.JS,
		nc:         cfg.NC,
		log:        cfg.Logger,
		groups:     cfg.Groups,
		batch:      cfg.Batch,
		maxMsg:     cfg.MaxMessageBytes,
		repl:       cfg.Replicas,
		maxBacklog: cfg.MaxBacklogBytes,
		metrics:    m,
	}, nil
}

// Setup creates or updates the CHAT_IN stream and the router consumer. It is
// idempotent.
func (r *Router) Setup(ctx context.Context) error {
	_, err := r.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        schema.StreamChatIn,
		Description: "accepted client messages, routed by the router",
		Subjects:    []string{schema.SubjectChatInAll},
		Retention:   jetstream.LimitsPolicy, // routed messages are purged in bulk (purgeRouted)
		MaxAge:      maxChatInAge,
		// A backlog the router cannot keep up with is bounded: past
		// MaxBytes, gateways are refused and tell their clients to resend
		// later, instead of the disk filling up.
		MaxBytes: r.maxBacklog,
		Discard:  jetstream.DiscardNew,
		// Older gateways group-commit client messages as atomic batches.
		AllowAtomicPublish: true,
		Storage:            jetstream.FileStorage,
		Duplicates:         2 * time.Minute,
		MaxMsgSize:         r.maxMsg,
		Replicas:           r.repl,
	})
	if err != nil {
		return fmt.Errorf("create stream %s: %w", schema.StreamChatIn, err)
	}
	_, err = r.js.CreateOrUpdateConsumer(ctx, schema.StreamChatIn, jetstream.ConsumerConfig{
		Durable:       ConsumerName,
		Description:   "routes CHAT_IN into INBOX and GROUP_LOG",
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       ackWait,
		BackOff:       backOff,
		MaxDeliver:    maxDeliver,
		MaxAckPending: 4 * r.batch,
		Replicas:      r.repl,
	})
	if err != nil {
		return fmt.Errorf("create consumer %s on %s: %w", ConsumerName, schema.StreamChatIn, err)
	}
	return nil
}

// Run routes messages until ctx ends. It then finishes the batch in hand
// (storing its copies and acking it) and returns nil: it fetches a batch at
// a time, so nothing is left fetched but unrouted at shutdown. Setup must
// have run before. Run returns an error if the consumer is missing or is
// deleted while running.
func (r *Router) Run(ctx context.Context) error {
	if ctx.Err() != nil {
		return nil
	}
	cons, err := r.js.Consumer(ctx, schema.StreamChatIn, ConsumerName)
	if err != nil {
		return fmt.Errorf("router consumer: %w", err)
	}
	stream, err := r.js.Stream(ctx, schema.StreamChatIn)
	if err != nil {
		return fmt.Errorf("router stream: %w", err)
	}

	live := make(chan *nats.Msg, liveBuffer)
	sub, err := r.nc.ChanQueueSubscribe(schema.SubjectLiveAll, QueueGroup, live)
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", schema.SubjectLiveAll, err)
	}
	liveCtx, stopLive := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { r.liveLoop(liveCtx, live) })
	// Purges run beside the routing rounds, so a round never waits for
	// one.
	wg.Go(func() { r.purgeLoop(liveCtx, cons, stream) })

	runErr := r.consumeLoop(ctx, cons, stream)

	if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		r.log.Warn("unsubscribe error", "subject", schema.SubjectLiveAll, "err", err)
	}
	stopLive()
	wg.Wait()
	return runErr
}

// consumeLoop fetches batches and routes them one after the other. It waits
// for the first message of a batch with a long poll, then takes whatever
// else is already there (up to Batch) without waiting, so a lone message is
// routed at once and a busy stream is routed in large batches.
func (r *Router) consumeLoop(ctx context.Context, cons jetstream.Consumer, stream jetstream.Stream) error {
	batch := make([]jetstream.Msg, 0, r.batch)
	for ctx.Err() == nil {
		batch = batch[:0]
		first, err := cons.Fetch(1, jetstream.FetchMaxWait(fetchWait))
		if err != nil {
			if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
				return fmt.Errorf("router consumer: %w", err)
			}
			r.log.Warn("fetch error", "err", err)
			sleepCtx(ctx, time.Second)
			continue
		}
		for m := range first.Messages() {
			batch = append(batch, m)
		}
		if err := first.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
				return fmt.Errorf("router consumer: %w", err)
			}
			r.log.Debug("fetch", "err", err)
		}
		if len(batch) > 0 && r.batch > 1 {
			if more, err := cons.FetchNoWait(r.batch - 1); err == nil {
				for m := range more.Messages() {
					batch = append(batch, m)
				}
			}
		}
		if len(batch) > 0 {
			// The batch in hand is finished even if ctx ends meanwhile.
			r.routeBatch(context.WithoutCancel(ctx), batch)
			clear(batch)
		}
	}
	return nil
}

// purgeLoop purges routed messages every purgeEvery until ctx ends.
func (r *Router) purgeLoop(ctx context.Context, cons jetstream.Consumer, stream jetstream.Stream) {
	t := time.NewTicker(purgeEvery)
	defer t.Stop()
	var purged uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			purged = r.purgeRouted(ctx, cons, stream, purged)
		}
	}
}

// purgeRouted removes from CHAT_IN every message at or below the consumer's
// ack floor: all of them are routed. CHAT_IN has limits retention because on
// a work-queue stream every ack is a delete that is fsynced on its own under
// sync: always (1,000 acks took 0.6–0.9 s here, against one purge); so the
// router deletes routed messages in bulk instead. It returns the new floor.
func (r *Router) purgeRouted(ctx context.Context, cons jetstream.Consumer, stream jetstream.Stream, purged uint64) uint64 {
	info, err := cons.Info(ctx)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("consumer info error", "err", err)
		}
		return purged
	}
	floor := info.AckFloor.Stream
	if floor <= purged {
		return purged
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSequence(floor+1)); err != nil {
		if ctx.Err() == nil {
			r.log.Warn("purge routed messages", "up_to", floor, "err", err)
		}
		return purged
	}
	return floor
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
