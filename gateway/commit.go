package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

const (
	// maxCommitBatch is the most client messages committed in one round.
	maxCommitBatch = 1000
	// maxBatchBytes caps one CHAT_IN batch message; the connection's
	// max_payload caps it further.
	maxBatchBytes = 1 << 20
	// batchHeadroom is left under max_payload for the subject and headers.
	batchHeadroom = 1 << 10
	// backlogHigh is the CHAT_IN size (bytes not yet routed and purged)
	// above which commits pause: about a second of routing.
	backlogHigh = 8 << 20
	// maxPause bounds the pause before one commit.
	maxPause = 200 * time.Millisecond
	// pauseStep is how often a pause re-checks the backlog.
	pauseStep = 10 * time.Millisecond
	// backlogPoll is how often the CHAT_IN backlog is read.
	backlogPoll = 200 * time.Millisecond
)

// committer group-commits CHAT_IN writes from every connection of this
// process. Under sync: always each JetStream write is fsynced before its
// PubAck, so writing one message at a time caps a gateway at a few thousand
// messages per second, and JetStream's atomic batches cost a staging store
// of their own per batch. The committer instead stores whatever was queued
// while its previous write was in flight as one CHAT_IN message, a batch
// (schema.ParseBatch): one write, one fsync, one message for the router to
// fetch and ack. A lone message still goes out at once; a busy gateway gets
// large batches.
//
// De-duplication of resends is the router's: it stores each copy with a
// Nats-Msg-Id made of the recipient, the sender and the client's message
// id, so a message sent twice reaches the inbox once.
//
// Back-pressure: when the router falls behind, CHAT_IN grows. Above
// backlogHigh unrouted bytes the committer waits up to maxPause before each
// commit (while the backlog stays high), so batches grow, SERVER_ACKs slow
// down and clients that wait for them send less: an overloaded server
// keeps delivering with bounded latency instead of accepting messages many
// times faster than it routes them (measured: 54,000 msg/s accepted,
// 9,000 msg/s delivered, a 10 s backlog). The pause is bounded, so a router
// that is down does not stop the gateway: CHAT_IN keeps accepting, up to
// its own limit.
//
// The committer's goroutines start with the first publish and end in
// close; publishes after close are committed by their caller.
type committer struct {
	js      jetstream.JetStream
	log     *slog.Logger
	timeout time.Duration
	subject string // schema.ChatInBatch(node)
	limit   int    // bytes per batch
	metrics *metrics

	// Back-pressure knobs (tests change them before the first publish).
	high     int64         // backlog bytes above which commits pause
	maxPause time.Duration // longest pause before one commit
	poll     time.Duration // how often the backlog is read
	backlog  atomic.Int64  // CHAT_IN bytes, as last read
	watching sync.WaitGroup

	mu      sync.Mutex
	queue   []*pubReq
	started bool
	closed  bool
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// entry is one accepted message for CHAT_IN.
type entry struct {
	data   []byte // protobuf Message, stamped
	device schema.DeviceID
}

type pubReq struct {
	entry
	// done receives the outcome exactly once, on the committer's
	// goroutine: it must not block.
	done func(error)
}

func newCommitter(js jetstream.JetStream, log *slog.Logger, timeout time.Duration, node string, m *metrics) *committer {
	limit := maxBatchBytes
	if mp := int(js.Conn().MaxPayload()); mp > 0 && mp-batchHeadroom < limit {
		limit = mp - batchHeadroom
	}
	return &committer{js: js, log: log, timeout: timeout, subject: schema.ChatInBatch(node), limit: limit, metrics: m,
		high: backlogHigh, maxPause: maxPause, poll: backlogPoll,
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
}

// publishAll queues entries in order (so they are stored in that order),
// then waits for all of them. errs[i] is the outcome of entries[i].
func (c *committer) publishAll(ctx context.Context, entries []entry) []error {
	errs := make([]error, len(entries))
	chans := make([]chan error, len(entries))
	reqs := make([]*pubReq, len(entries))
	for i, e := range entries {
		ch := make(chan error, 1)
		chans[i] = ch
		reqs[i] = &pubReq{entry: e, done: func(err error) { ch <- err }}
	}
	c.enqueue(reqs...)
	for i, ch := range chans {
		select {
		case errs[i] = <-ch:
		case <-ctx.Done():
			// It may still be stored; the client's resend with the same
			// id is then de-duplicated by the router.
			errs[i] = fmt.Errorf("publish %s: %w", c.subject, errPublishTimeout)
		}
	}
	return errs
}

// enqueue queues reqs in order without waiting; each done is called once
// its batch is acknowledged, fails or times out (the committer's timeout).
// After close, enqueue commits reqs itself before it returns.
func (c *committer) enqueue(reqs ...*pubReq) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.commit(reqs)
		return
	}
	if !c.started {
		c.started = true
		go c.loop()
		c.watching.Go(c.watch)
	}
	c.queue = append(c.queue, reqs...)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *committer) loop() {
	defer close(c.done)
	for {
		select {
		case <-c.wake:
		case <-c.stop:
			for c.commitQueued() {
			}
			return
		}
		for c.throttle() && c.commitQueued() {
		}
	}
}

// throttle waits while the CHAT_IN backlog is above c.high, at most
// c.maxPause. It reports false when the committer is closing.
func (c *committer) throttle() bool {
	if c.backlog.Load() <= c.high {
		return true
	}
	start := time.Now()
	defer func() { c.metrics.paused.Add(time.Since(start).Seconds()) }()
	t := time.NewTicker(pauseStep)
	defer t.Stop()
	for time.Since(start) < c.maxPause && c.backlog.Load() > c.high {
		select {
		case <-t.C:
		case <-c.stop:
			return true // closing: commit what is queued at once
		}
	}
	return true
}

// watch reads the CHAT_IN backlog every c.poll until close.
func (c *committer) watch() {
	t := time.NewTicker(c.poll)
	defer t.Stop()
	var stream jetstream.Stream
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
		var err error
		if stream == nil {
			stream, err = c.js.Stream(ctx, schema.StreamChatIn)
		}
		var info *jetstream.StreamInfo
		if err == nil {
			info, err = stream.Info(ctx)
		}
		cancel()
		if err != nil {
			// No figure (CHAT_IN missing or unreachable): no back-pressure
			// from a stale one; look the stream up again next time.
			stream = nil
			c.backlog.Store(0)
			c.metrics.backlog.Set(0)
			continue
		}
		c.backlog.Store(int64(info.State.Bytes))
		c.metrics.backlog.Set(float64(info.State.Bytes))
	}
}

// commitQueued commits up to maxCommitBatch queued messages and reports
// whether it found any.
func (c *committer) commitQueued() bool {
	c.mu.Lock()
	n := min(len(c.queue), maxCommitBatch)
	batch := c.queue[:n:n]
	c.queue = c.queue[n:]
	if len(c.queue) == 0 {
		c.queue = nil
	}
	c.mu.Unlock()
	if n == 0 {
		return false
	}
	c.commit(batch)
	return true
}

// commit writes reqs as CHAT_IN batches of at most c.limit bytes, all
// published before the first PubAck is awaited, and reports each outcome.
func (c *committer) commit(reqs []*pubReq) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	type pending struct {
		reqs []*pubReq
		f    jetstream.PubAckFuture
		at   time.Time // when it was published
	}
	var sent []pending
	for len(reqs) > 0 {
		size, n := 0, 0
		for n < len(reqs) {
			s := schema.BatchEntrySize(len(reqs[n].data), reqs[n].device)
			if n > 0 && size+s > c.limit {
				break
			}
			size += s
			n++
		}
		part := reqs[:n]
		reqs = reqs[n:]
		data := make([]byte, 0, size)
		for _, r := range part {
			data = schema.AppendBatchEntry(data, r.data, r.device)
		}
		msg := &nats.Msg{Subject: c.subject, Header: nats.Header{schema.HeaderBatch: []string{"1"}}, Data: data}
		c.metrics.commitMsgs.Observe(float64(len(part)))
		at := time.Now()
		f, err := c.js.PublishMsgAsync(msg)
		if err != nil {
			c.fail(part, fmt.Errorf("publish %s: %w", c.subject, err))
			continue
		}
		sent = append(sent, pending{part, f, at})
	}
	for _, p := range sent {
		select {
		case <-p.f.Ok():
			c.metrics.commitTime.Observe(time.Since(p.at).Seconds())
			for _, r := range p.reqs {
				r.done(nil)
			}
		case err := <-p.f.Err():
			c.log.Warn("chat_in batch not stored", "messages", len(p.reqs), "err", err)
			c.fail(p.reqs, fmt.Errorf("publish %s: %w", c.subject, err))
		case <-ctx.Done():
			c.fail(p.reqs, fmt.Errorf("publish %s: %w", c.subject, errPublishTimeout))
		}
	}
}

func (c *committer) fail(reqs []*pubReq, err error) {
	for _, r := range reqs {
		r.done(err)
	}
}

// close commits what is queued and stops the goroutine.
func (c *committer) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	started := c.started
	c.mu.Unlock()
	close(c.stop)
	if started {
		<-c.done
	}
	c.watching.Wait()
}
