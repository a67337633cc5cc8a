package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
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
// The committer's goroutine starts with the first publish and ends in
// close; publishes after close are written as batches of one.
type committer struct {
	js      jetstream.JetStream
	log     *slog.Logger
	timeout time.Duration
	subject string // schema.ChatInBatch(node)
	limit   int    // bytes per batch
	metrics *metrics

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
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
}

// publish stores e in CHAT_IN and returns once it is acknowledged or ctx
// ends.
func (c *committer) publish(ctx context.Context, e entry) error {
	return c.publishAll(ctx, []entry{e})[0]
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
		for c.commitQueued() {
		}
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
}
