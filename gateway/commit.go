package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"
)

// maxCommitBatch is the most CHAT_IN messages written in one atomic batch
// (the server allows 1,000).
const maxCommitBatch = 500

// committer group-commits CHAT_IN publishes from every connection of this
// process. Under sync: always each JetStream write is fsynced before its
// PubAck, so publishing one message at a time caps the whole gateway at a
// few thousand messages per second. The committer writes whatever is queued
// while the previous commit was in flight as one atomic batch (one fsync),
// so a lone message still goes out at once, and a busy gateway gets large
// batches. If an atomic batch fails (for example because it holds a resend
// whose Nats-Msg-Id is a duplicate, which rejects the whole batch), its
// messages are published one by one, so each gets its own exact outcome.
//
// The committer's goroutine starts with the first publish and ends in
// close; publishes after close go straight to JetStream.
type committer struct {
	js      jetstream.JetStream
	log     *slog.Logger
	timeout time.Duration

	mu      sync.Mutex
	queue   []*pubReq
	started bool
	closed  bool
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

type pubReq struct {
	msg *nats.Msg
	err chan error // buffered: the committer never blocks on it
}

func newCommitter(js jetstream.JetStream, log *slog.Logger, timeout time.Duration) *committer {
	return &committer{js: js, log: log, timeout: timeout,
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
}

// publish stores msg in CHAT_IN and returns once it is acknowledged (a
// duplicate counts as stored) or ctx ends.
func (c *committer) publish(ctx context.Context, msg *nats.Msg) error {
	return c.publishAll(ctx, []*nats.Msg{msg})[0]
}

// publishAll queues msgs in order (so they are stored in that order), then
// waits for all of them. errs[i] is the outcome of msgs[i].
func (c *committer) publishAll(ctx context.Context, msgs []*nats.Msg) []error {
	errs := make([]error, len(msgs))
	reqs := make([]pubReq, len(msgs))
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		for i, m := range msgs {
			errs[i] = c.single(ctx, m)
		}
		return errs
	}
	if !c.started {
		c.started = true
		go c.loop()
	}
	for i, m := range msgs {
		reqs[i] = pubReq{msg: m, err: make(chan error, 1)}
		c.queue = append(c.queue, &reqs[i])
	}
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	for i := range reqs {
		select {
		case errs[i] = <-reqs[i].err:
		case <-ctx.Done():
			// It may still be stored; the client's resend with the same
			// id is then de-duplicated.
			errs[i] = fmt.Errorf("publish %s: %w", msgs[i].Subject, errPublishTimeout)
		}
	}
	return errs
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

func (c *committer) commit(batch []*pubReq) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	if len(batch) > 1 {
		err := c.atomic(ctx, batch)
		if err == nil {
			for _, r := range batch {
				r.err <- nil
			}
			return
		}
		c.log.Debug("atomic batch failed, publishing one by one", "size", len(batch), "err", err)
	}
	futures := make([]jetstream.PubAckFuture, len(batch))
	for i, r := range batch {
		f, err := c.js.PublishMsgAsync(r.msg)
		if err != nil {
			r.err <- fmt.Errorf("publish %s: %w", r.msg.Subject, err)
			continue
		}
		futures[i] = f
	}
	for i, f := range futures {
		if f == nil {
			continue
		}
		select {
		case <-f.Ok():
			batch[i].err <- nil
		case err := <-f.Err():
			batch[i].err <- fmt.Errorf("publish %s: %w", batch[i].msg.Subject, err)
		case <-ctx.Done():
			batch[i].err <- fmt.Errorf("publish %s: %w", batch[i].msg.Subject, errPublishTimeout)
		}
	}
}

func (c *committer) atomic(ctx context.Context, batch []*pubReq) error {
	bp, err := jetstreamext.NewBatchPublisher(c.js)
	if err != nil {
		return err
	}
	for _, r := range batch[:len(batch)-1] {
		if err := bp.AddMsg(r.msg); err != nil {
			_ = bp.Discard()
			return err
		}
	}
	_, err = bp.CommitMsg(ctx, batch[len(batch)-1].msg)
	return err
}

// single publishes one message directly (after close).
func (c *committer) single(ctx context.Context, msg *nats.Msg) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if _, err := c.js.PublishMsg(ctx, msg); err != nil {
		return fmt.Errorf("publish %s: %w", msg.Subject, err)
	}
	return nil
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
