package router

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

// item is one CHAT_IN message of a batch and what became of it.
type item struct {
	jm     jetstream.Msg
	m      *schema.Message
	sender schema.UserID
	// base is the Nats-Msg-Id prefix of its copies: the ServerID.
	base string
	// done: already acked or terminated while planning.
	done bool
	// failed: a copy or notice could not be stored (transient); retry.
	failed bool
	// full: at least one recipient's inbox is at its cap.
	full bool
}

// out is one message to store in INBOX for items[owner].
type out struct {
	msg    *nats.Msg
	owner  int
	notice bool // an error notice to the sender, not a copy
}

// routeBatch routes a batch of CHAT_IN messages: it stores every copy and
// notice, then acks (or retries) each CHAT_IN message.
func (r *Router) routeBatch(ctx context.Context, batch []jetstream.Msg) {
	r.settle(r.storeBatch(ctx, batch))
}

// storeBatch plans every copy of batch, stores them as atomic batches and
// sends inbox_full notices. It acks or terminates only the messages that
// need no storage (poison, client acks, ephemeral).
func (r *Router) storeBatch(ctx context.Context, batch []jetstream.Msg) []item {
	items := make([]item, len(batch))
	var outs []out
	groups := make(groupCache)
	for i, jm := range batch {
		items[i].jm = jm
		outs = r.plan(ctx, items, i, outs, groups)
	}

	p := progress{items: items, last: time.Now()}
	r.store(ctx, items, outs, &p)

	// Second round: notices for messages some of whose recipients had a
	// full inbox. A message that will be retried gets its notice then.
	var notices []out
	for i := range items {
		it := &items[i]
		if it.full && !it.failed && !it.done {
			notices = append(notices, r.notice(it, i, schema.CodeInboxFull, "recipient inbox is full"))
		}
	}
	r.store(ctx, items, notices, &p)
	return items
}

// settle acks every stored message and retries the failed ones.
func (r *Router) settle(items []item) {
	for i := range items {
		it := &items[i]
		switch {
		case it.done:
		case it.failed:
			r.retry(it)
		default:
			if err := it.jm.Ack(); err != nil {
				r.log.Warn("ack error", "msg_id", it.m.ID, "user", it.sender, "err", err)
			}
		}
	}
}

// plan decodes items[i] and appends the INBOX messages it needs to outs.
// Messages that need no storage are acked or terminated here.
func (r *Router) plan(ctx context.Context, items []item, i int, outs []out, groups groupCache) []out {
	it := &items[i]
	jm := it.jm
	m, err := schema.UnmarshalProto(jm.Data())
	if err == nil {
		it.m = m
		it.sender, err = senderOf(jm.Subject(), m)
	}
	if err != nil {
		r.log.Error("poison message terminated", "subject", jm.Subject(), "err", err)
		r.term(it)
		return outs
	}
	it.base = m.ServerID
	if it.base == "" {
		// The gateway always sets ServerID. Without it every copy of
		// every such message would share one Nats-Msg-Id; the CHAT_IN
		// sequence is just as unique and stable across redeliveries.
		it.base = "in" + strconv.FormatUint(streamSeq(jm), 10)
	}

	switch {
	case m.Type == schema.TypeClientAck:
		r.log.Debug("client ack on chat_in dropped", "msg_id", m.ID, "user", it.sender)
		r.ack(it)
		return outs
	case m.Ephemeral:
		r.publishLive(ctx, m, it.sender, jm.Data(), groups)
		r.ack(it)
		return outs
	case m.Channel == schema.ChannelGroup:
		g := schema.GroupID(m.Destination)
		if !g.Valid() {
			return append(outs, r.notice(it, i, schema.CodeBadTo, "destination is not a valid group id"))
		}
		rcpts, err := r.recipients(ctx, groups, g, it.sender)
		switch {
		case errors.Is(err, errUnknownGroup):
			return append(outs, r.notice(it, i, schema.CodeUnknownGroup, "unknown group"))
		case errors.Is(err, errNotMember):
			r.log.Info("group message from non-member", "msg_id", m.ID, "user", it.sender, "group", g)
			return append(outs, r.notice(it, i, schema.CodeNotMember, "sender is not a member of the group"))
		case err != nil:
			r.log.Warn("group lookup error", "msg_id", m.ID, "user", it.sender, "group", g, "err", err)
			it.failed = true
			return outs
		}
		for _, u := range rcpts {
			outs = append(outs, r.copyTo(it, i, u))
		}
		return outs
	default:
		to := schema.UserID(m.Destination)
		if !to.Valid() {
			return append(outs, r.notice(it, i, schema.CodeBadTo, "destination is not a valid user id"))
		}
		return append(outs, r.copyTo(it, i, to))
	}
}

// copyTo returns the copy of items[i] for recipient u: the unchanged bytes.
func (r *Router) copyTo(it *item, i int, u schema.UserID) out {
	return out{
		msg: &nats.Msg{
			Subject: schema.UserInbox(u),
			Header:  nats.Header{schema.HeaderMsgID: []string{it.base + ":" + schema.Token(u)}},
			Data:    it.jm.Data(),
		},
		owner: i,
	}
}

// notice returns an error notice about items[i] for its sender.
func (r *Router) notice(it *item, i int, code, reason string) out {
	n := schema.ErrorNotice(it.sender, it.m.ID, code, reason, uint64(time.Now().UnixMilli()))
	n.Ephemeral = false
	return out{
		msg: &nats.Msg{
			Subject: schema.UserInbox(it.sender),
			Header:  nats.Header{schema.HeaderMsgID: []string{it.base + ":error"}},
			Data:    n.MarshalProto(),
		},
		owner:  i,
		notice: true,
	}
}

// store writes outs to INBOX in atomic batches and records the outcome on
// their owners.
//
// A handful of copies are published one by one: an atomic batch has a fixed
// cost (the server stages it in a file store of its own, with an fsynced
// metadata write) that outweighs a few single publishes.
func (r *Router) store(ctx context.Context, items []item, outs []out, p *progress) {
	for len(outs) > 0 {
		n := min(len(outs), maxAtomicBatch)
		chunk := outs[:n]
		outs = outs[n:]
		p.touch()
		if len(chunk) > smallBatch {
			err := r.publishAtomic(ctx, chunk)
			if err == nil {
				continue
			}
			r.log.Debug("atomic batch rejected, publishing one by one", "count", len(chunk), "err", err)
		}
		for _, o := range chunk {
			it := &items[o.owner]
			switch res := r.publishOne(ctx, o.msg); {
			case res == stored:
			case res == full && o.notice:
				r.log.Warn("sender inbox full, notice dropped", "msg_id", it.m.ID, "user", it.sender)
			case res == full:
				r.log.Info("recipient inbox full", "msg_id", it.m.ID, "user", it.sender, "subject", o.msg.Subject)
				it.full = true
			default:
				it.failed = true
			}
		}
	}
}

// retry negatively acknowledges it with a delay growing with its delivery
// count, or terminates it on its last allowed delivery.
func (r *Router) retry(it *item) {
	n := numDelivered(it.jm)
	if n >= maxDeliver {
		r.log.Error("routing gave up", "msg_id", it.m.ID, "user", it.sender, "deliveries", n)
		r.term(it)
		return
	}
	if err := it.jm.NakWithDelay(retryDelay(n)); err != nil {
		r.log.Warn("nak error", "msg_id", it.m.ID, "user", it.sender, "err", err)
	}
}

// retryDelay is 1s, 2s, 4s, ... for delivery n = 1, 2, 3, ..., capped at
// maxRetryDelay.
func retryDelay(n uint64) time.Duration {
	if n < 1 {
		n = 1
	}
	if n > 7 {
		return maxRetryDelay
	}
	return min(time.Second<<(n-1), maxRetryDelay)
}

func (r *Router) ack(it *item) {
	it.done = true
	if err := it.jm.Ack(); err != nil {
		r.log.Warn("ack error", "subject", it.jm.Subject(), "err", err)
	}
}

func (r *Router) term(it *item) {
	it.done = true
	if err := it.jm.Term(); err != nil {
		r.log.Warn("term error", "subject", it.jm.Subject(), "err", err)
	}
}

func numDelivered(jm jetstream.Msg) uint64 {
	md, err := jm.Metadata()
	if err != nil {
		return 1
	}
	return md.NumDelivered
}

func streamSeq(jm jetstream.Msg) uint64 {
	md, err := jm.Metadata()
	if err != nil {
		return 0
	}
	return md.Sequence.Stream
}

// progress keeps a long batch from being redelivered while it is still
// being stored: it extends the ack wait of its messages now and then.
type progress struct {
	items []item
	last  time.Time
}

func (p *progress) touch() {
	if time.Since(p.last) < ackWait/3 {
		return
	}
	p.last = time.Now()
	for i := range p.items {
		if !p.items[i].done {
			_ = p.items[i].jm.InProgress()
		}
	}
}

// senderOf returns the sender of m received on subject, which must be the
// user named in the subject's last token.
func senderOf(subject string, m *schema.Message) (schema.UserID, error) {
	u, err := schema.UserFromSubject(subject)
	if err != nil || !u.Valid() {
		return "", fmt.Errorf("subject %s names no valid user", subject)
	}
	if string(u) != m.Source {
		return "", fmt.Errorf("source %q does not match subject %s", m.Source, subject)
	}
	return u, nil
}
