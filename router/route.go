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

// item is one client message of a batch and what became of it. A CHAT_IN
// message holds one client message, or many when a gateway stored a batch
// (schema.ParseBatch).
type item struct {
	src    int    // index of its CHAT_IN message in the fetched batch
	pos    int    // index within that CHAT_IN message (0 for a single message)
	data   []byte // protobuf Message
	m      *schema.Message
	sender schema.UserID
	// base is the sender part of its copies' Nats-Msg-Id.
	base string
	// done: needs no storage (client ack, ephemeral, poison).
	done bool
	// failed: a copy or notice could not be stored (transient); retry.
	failed bool
	// full: at least one recipient's inbox is at its cap.
	full bool
	// kind, copies (stored) and noticed (the code of its stored error
	// notice) are counted once its CHAT_IN message is settled.
	kind    kind
	copies  int
	noticed string
}

// out is one message to store (in INBOX or GROUP_LOG) for items[owner].
type out struct {
	msg    *nats.Msg
	owner  int
	notice bool   // an error notice to the sender, not a copy
	group  bool   // the copy of a group message, on GROUP_LOG
	code   string // the notice's error code
}

// fetched is one CHAT_IN message of a batch.
type fetched struct {
	jm    jetstream.Msg
	batch bool // a gateway batch of client messages
	term  bool // poison: terminate instead of acking
}

// routeBatch routes a batch of CHAT_IN messages: it stores every copy and
// notice, then acks (or retries) each CHAT_IN message.
func (r *Router) routeBatch(ctx context.Context, batch []jetstream.Msg) {
	start := time.Now()
	srcs := make([]fetched, len(batch))
	for i, jm := range batch {
		srcs[i].jm = jm
		if md, err := jm.Metadata(); err == nil {
			r.metrics.wait.Observe(max(start.Sub(md.Timestamp), 0).Seconds())
		}
	}
	r.settle(srcs, r.storeBatch(ctx, srcs))
	r.metrics.round.Observe(time.Since(start).Seconds())
}

// storeBatch plans every copy of the client messages in srcs, stores them
// as atomic batches and sends inbox_full notices.
func (r *Router) storeBatch(ctx context.Context, srcs []fetched) []item {
	items := r.unpack(srcs)
	var outs []out
	groups := make(groupCache)
	for i := range items {
		outs = r.plan(ctx, srcs, items, i, outs, groups)
	}

	// An atomic batch is written to one stream: INBOX copies and notices
	// in one, group messages (GROUP_LOG) in another.
	inbox, group := outs[:0:0], outs[:0:0]
	for _, o := range outs {
		if o.group {
			group = append(group, o)
		} else {
			inbox = append(inbox, o)
		}
	}
	p := progress{srcs: srcs, last: time.Now()}
	r.store(ctx, items, group, &p)
	r.store(ctx, items, inbox, &p)

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

// unpack returns the client messages of srcs in order. A batch that does
// not parse is poison: its CHAT_IN message is terminated.
func (r *Router) unpack(srcs []fetched) []item {
	items := make([]item, 0, len(srcs))
	for k := range srcs {
		jm := srcs[k].jm
		if jm.Headers().Get(schema.HeaderBatch) == "" {
			items = append(items, item{src: k, data: jm.Data()})
			continue
		}
		srcs[k].batch = true
		entries, err := schema.ParseBatch(jm.Data())
		if err != nil {
			r.log.Error("poison batch terminated", "subject", jm.Subject(), "err", err)
			srcs[k].term = true
			r.metrics.byKind[kindPoison].Inc()
			continue
		}
		for pos, e := range entries {
			items = append(items, item{src: k, pos: pos, data: e.Message})
		}
	}
	return items
}

// settle acks every CHAT_IN message whose client messages are all stored
// and retries the others (all of a batch: the copies already stored are
// de-duplicated on the retry). The client messages of the CHAT_IN messages
// acked or terminated are counted with their copies and notices, so a
// retried one is counted once.
func (r *Router) settle(srcs []fetched, items []item) {
	failed := make([]bool, len(srcs))
	for i := range items {
		if items[i].failed {
			failed[items[i].src] = true
		}
	}
	for i := range items {
		it := &items[i]
		if failed[it.src] {
			continue
		}
		r.metrics.byKind[it.kind].Inc()
		if it.copies > 0 {
			r.metrics.copies.Add(float64(it.copies))
		}
		if it.noticed != "" {
			r.metrics.notices.WithLabelValues(it.noticed).Inc()
		}
	}
	for k := range srcs {
		jm := srcs[k].jm
		switch {
		case srcs[k].term:
			if err := jm.Term(); err != nil {
				r.log.Warn("term error", "subject", jm.Subject(), "err", err)
			}
		case failed[k]:
			r.retry(jm)
		default:
			if err := jm.Ack(); err != nil {
				r.log.Warn("ack error", "subject", jm.Subject(), "err", err)
			}
		}
	}
}

// plan decodes items[i] and appends the messages it needs stored to outs.
// Messages that need no storage are marked done.
func (r *Router) plan(ctx context.Context, srcs []fetched, items []item, i int, outs []out, groups groupCache) []out {
	it := &items[i]
	jm := srcs[it.src].jm
	m, err := schema.UnmarshalProto(it.data)
	if err == nil {
		it.m = m
		it.sender, err = senderIn(srcs[it.src], m)
	}
	if err != nil {
		// A bad single message is terminated; a bad entry of a batch is
		// dropped and the rest of the batch routed.
		r.log.Error("poison message dropped", "subject", jm.Subject(), "seq", streamSeq(jm), "err", err)
		it.done = true
		it.kind = kindPoison
		if !srcs[it.src].batch {
			srcs[it.src].term = true
		}
		return outs
	}
	switch {
	case m.ID != "":
		it.base = schema.Token(it.sender) + ":" + m.ID
	case m.ServerID != "":
		it.base = schema.Token(it.sender) + ":s:" + m.ServerID
	default:
		// Gateways validate ids; without one, the CHAT_IN sequence and
		// position are just as unique and stable across redeliveries.
		it.base = schema.Token(it.sender) + ":in" + strconv.FormatUint(streamSeq(jm), 10) + "." + strconv.Itoa(it.pos)
	}

	switch {
	case m.Type == schema.TypeClientAck:
		r.log.Debug("client ack on chat_in dropped", "msg_id", m.ID, "user", it.sender)
		it.done = true
		it.kind = kindClientAck
		return outs
	case m.Ephemeral:
		r.publishLive(ctx, m, it.sender, it.data, groups)
		it.done = true
		it.kind = kindEphemeral
		return outs
	case m.Channel == schema.ChannelGroup:
		it.kind = kindGroup
		g := schema.GroupID(m.Destination)
		if !g.Valid() {
			return append(outs, r.notice(it, i, schema.CodeBadTo, "destination is not a valid group id"))
		}
		err := r.checkMember(ctx, groups, g, it.sender)
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
		return append(outs, r.groupCopy(it, i, g))
	default:
		it.kind = kindDirect
		to := schema.UserID(m.Destination)
		if !to.Valid() {
			return append(outs, r.notice(it, i, schema.CodeBadTo, "destination is not a valid user id"))
		}
		return append(outs, r.copyTo(it, i, to))
	}
}

// copyTo returns the copy of items[i] for recipient u: the unchanged bytes,
// de-duplicated by recipient, sender and client message id, so a resend of
// a message (or a retry of its batch) is stored once.
func (r *Router) copyTo(it *item, i int, u schema.UserID) out {
	return out{
		msg: &nats.Msg{
			Subject: schema.UserInbox(u),
			Header:  nats.Header{schema.HeaderMsgID: []string{"c:" + schema.Token(u) + ":" + it.base}},
			Data:    it.data,
		},
		owner: i,
	}
}

// groupCopy returns the one stored copy of group message items[i]: the
// unchanged bytes on the group's GROUP_LOG subject, marked with its sender
// (so delivery skips it for the sender's own devices without decoding it)
// and de-duplicated by group, sender and client message id.
func (r *Router) groupCopy(it *item, i int, g schema.GroupID) out {
	return out{
		msg: &nats.Msg{
			Subject: schema.GroupLog(g),
			Header: nats.Header{
				schema.HeaderMsgID:  []string{"g:" + schema.Token(g) + ":" + it.base},
				schema.HeaderSender: []string{schema.Token(it.sender)},
			},
			Data: it.data,
		},
		owner: i,
		group: true,
	}
}

// notice returns an error notice about items[i] for its sender.
func (r *Router) notice(it *item, i int, code, reason string) out {
	n := schema.ErrorNotice(it.sender, it.m.ID, code, reason, uint64(time.Now().UnixMilli()))
	n.Ephemeral = false
	return out{
		msg: &nats.Msg{
			Subject: schema.UserInbox(it.sender),
			Header:  nats.Header{schema.HeaderMsgID: []string{"e:" + it.base}},
			Data:    n.MarshalProto(),
		},
		owner:  i,
		notice: true,
		code:   code,
	}
}

// store writes outs (all on one stream) in atomic batches and records the outcome on
// their owners.
//
// A handful of copies are published pipelined, each on its own: an atomic
// batch has a fixed cost (the server stages it in a file store of its own,
// with an fsynced metadata write) that outweighs a few single publishes.
// Single publishes keep their order: the stream stores them as they arrive
// on the router's connection.
func (r *Router) store(ctx context.Context, items []item, outs []out, p *progress) {
	for len(outs) > 0 {
		n := min(len(outs), maxAtomicBatch)
		chunk := outs[:n]
		outs = outs[n:]
		p.touch()
		if len(chunk) > smallBatch {
			err := r.publishAtomic(ctx, chunk)
			if err == nil {
				for _, o := range chunk {
					recordStored(items, o)
				}
				continue
			}
			r.log.Debug("atomic batch rejected, publishing each copy on its own", "count", len(chunk), "err", err)
		}
		for i, res := range r.publishEach(ctx, chunk) {
			o := chunk[i]
			it := &items[o.owner]
			switch {
			case res == stored:
				recordStored(items, o)
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

// recordStored records on its owner that o is stored.
func recordStored(items []item, o out) {
	if o.notice {
		items[o.owner].noticed = o.code
		return
	}
	items[o.owner].copies++
}

// retry negatively acknowledges jm with a delay growing with its delivery
// count, or terminates it on its last allowed delivery.
func (r *Router) retry(jm jetstream.Msg) {
	n := numDelivered(jm)
	if n >= maxDeliver {
		r.log.Error("routing gave up", "subject", jm.Subject(), "seq", streamSeq(jm), "deliveries", n)
		if err := jm.Term(); err != nil {
			r.log.Warn("term error", "subject", jm.Subject(), "err", err)
		}
		return
	}
	if err := jm.NakWithDelay(retryDelay(n)); err != nil {
		r.log.Warn("nak error", "subject", jm.Subject(), "err", err)
		return
	}
	r.metrics.retries.Inc()
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
	srcs []fetched
	last time.Time
}

func (p *progress) touch() {
	if time.Since(p.last) < ackWait/3 {
		return
	}
	p.last = time.Now()
	for i := range p.srcs {
		if !p.srcs[i].term {
			_ = p.srcs[i].jm.InProgress()
		}
	}
}

// senderIn returns the sender of m, received in src. A gateway batch holds
// messages of many users, each stamped with its authenticated sender; a
// single message's sender must also be the user its subject names.
func senderIn(src fetched, m *schema.Message) (schema.UserID, error) {
	if src.batch {
		u := schema.UserID(m.Source)
		if !u.Valid() {
			return "", fmt.Errorf("source %q is not a valid user id", m.Source)
		}
		return u, nil
	}
	return senderOf(src.jm.Subject(), m)
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
