package push

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

// Kinds of consumed stream: the index of a stream in batch.newest.
const (
	inboxStream = iota // INBOX: one copy per recipient, msg.user.<user>
	groupStream        // GROUP_LOG: one copy per group message, msg.group.<gid>
	numStreams
)

// msgKey identifies a stored message. The sequences of INBOX and GROUP_LOG
// overlap, so a sequence alone does not.
type msgKey struct {
	stream int // inboxStream or groupStream
	seq    uint64
}

// held is an INBOX or GROUP_LOG message this process works on. It is acked
// when refs drops to zero: every push it is part of is done. A batch
// abandoned at shutdown never releases its messages; Run naks them instead.
type held struct {
	msg  jetstream.Msg // the latest delivery of the message
	key  msgKey        // its stream and stream sequence
	refs int           // open batches holding it, plus one while it is looked up
}

type deviceKey struct {
	user   schema.UserID
	device schema.DeviceID
}

// batch is one coalescing window of one device: the messages that will be
// sent as one push when the window ends. Its messages may come from both
// streams; latest is the one pushed (see enqueue).
type batch struct {
	key      deviceKey
	token    string
	deadline time.Time
	latest   *schema.Message
	newest   [numStreams]uint64 // highest sequence folded in, per stream (0: none)
	count    int
	msgs     []*held
}

// runner is the state of one Run.
type runner struct {
	s     *Service
	ready chan *batch
	wake  chan struct{}

	mu      sync.Mutex
	held    map[msgKey]*held
	pending map[deviceKey]*batch
	order   []*batch // pending in deadline order (all windows are equally long)
}

func newRunner(s *Service) *runner {
	return &runner{
		s:       s,
		ready:   make(chan *batch, s.workers),
		wake:    make(chan struct{}, 1),
		held:    make(map[msgKey]*held),
		pending: make(map[deviceKey]*batch),
	}
}

// lookupLoop decides for each message, of either stream, which devices get
// a push and adds it to their batches.
func (r *runner) lookupLoop(ctx context.Context, in <-chan jetstream.Msg) {
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-in:
			r.lookup(ctx, m)
		}
	}
}

func (r *runner) lookup(ctx context.Context, m jetstream.Msg) {
	log := msgLog{base: r.s.log, attrs: []any{"subject", m.Subject()}}
	meta, err := m.Metadata()
	if err != nil {
		log.Error("push message without metadata", "err", err)
		_ = m.Term()
		return
	}
	key := msgKey{seq: meta.Sequence.Stream}
	switch meta.Stream {
	case schema.StreamInbox:
		key.stream = inboxStream
	case schema.StreamGroupLog:
		key.stream = groupStream
	default:
		log.Error("push message from an unexpected stream", "stream", meta.Stream)
		_ = m.Term()
		return
	}
	log = log.with("stream", meta.Stream, "seq", key.seq)

	r.mu.Lock()
	if h, ok := r.held[key]; ok {
		// A redelivery of a message still being worked on: ack the newest
		// delivery when done.
		h.msg = m
		r.mu.Unlock()
		return
	}
	h := &held{msg: m, key: key, refs: 1}
	r.held[key] = h
	r.mu.Unlock()

	var targets []target
	var ok bool
	if key.stream == groupStream {
		targets, ok = r.groupTargets(ctx, log, m, meta)
	} else {
		targets, ok = r.inboxTargets(ctx, log, m, meta)
	}
	if !ok {
		r.mu.Lock()
		delete(r.held, key)
		r.mu.Unlock()
		return
	}
	if len(targets) > 0 {
		r.enqueue(h, targets)
	}
	r.release([]*held{h})
}

// msgLog is the logging context of one message's lookup: the lookup runs
// for every stored message and almost never logs, while slog's With renders
// its attributes at once (2.4% of the server's CPU at 5,000 direct messages
// a second), so the attributes are only collected here and handed over
// when a line is logged.
type msgLog struct {
	base  *slog.Logger
	attrs []any
}

func (l msgLog) with(args ...any) msgLog {
	return msgLog{base: l.base, attrs: append(slices.Clip(l.attrs), args...)}
}

func (l msgLog) Info(msg string, args ...any) {
	l.base.Info(msg, append(slices.Clip(l.attrs), args...)...)
}

func (l msgLog) Warn(msg string, args ...any) {
	l.base.Warn(msg, append(slices.Clip(l.attrs), args...)...)
}

func (l msgLog) Error(msg string, args ...any) {
	l.base.Error(msg, append(slices.Clip(l.attrs), args...)...)
}

// target is one device to push a message to.
type target struct {
	key   deviceKey
	token string
	msg   *schema.Message
}

// inboxTargets returns the devices the INBOX message m is pushed to: the
// recipient's (the user of its subject). ok=false means the message was
// already terminated or nak'ed and must be forgotten.
func (r *runner) inboxTargets(ctx context.Context, log msgLog, m jetstream.Msg, meta *jetstream.MsgMetadata) (_ []target, ok bool) {
	msg, err := schema.UnmarshalProto(m.Data())
	if err != nil {
		log.Error("push undecodable message", "err", err)
		_ = m.Term()
		return nil, false
	}
	log = log.with("msg_id", msg.ID)
	user, err := schema.UserFromSubject(m.Subject())
	if err != nil || !user.Valid() {
		log.Error("push bad inbox subject", "err", err)
		_ = m.Term()
		return nil, false
	}
	if !pushable(msg, user) {
		return nil, true
	}
	out, what, err := r.userTargets(ctx, user, msg, nil)
	if err != nil {
		r.nak(ctx, log.with("user", user), m, meta, what, err)
		return nil, false
	}
	return out, true
}

// groupTargets returns the devices the GROUP_LOG message m is pushed to:
// those of every current member of the group (Config.Groups) but the
// sender, chosen as for an INBOX message of that member. ok=false means the
// message was already terminated or nak'ed and must be forgotten.
//
// The member list is the current one, not the one at the message's
// sequence: a member added or removed between the send and this lookup
// (normally milliseconds) may get a push too many or too few.
func (r *runner) groupTargets(ctx context.Context, log msgLog, m jetstream.Msg, meta *jetstream.MsgMetadata) (_ []target, ok bool) {
	msg, err := schema.UnmarshalProto(m.Data())
	if err != nil {
		log.Error("push undecodable message", "err", err)
		_ = m.Term()
		return nil, false
	}
	log = log.with("msg_id", msg.ID)
	group, err := schema.GroupFromSubject(m.Subject())
	if err != nil || !group.Valid() {
		log.Error("push bad group log subject", "err", err)
		_ = m.Term()
		return nil, false
	}
	log = log.with("group", group)
	if !pushableKind(msg) {
		return nil, true
	}
	// The sender is msg.Source; the router also names it in the
	// Vartalap-Sender header (Token of the user). Neither gets a push.
	sender := schema.UserID(msg.Source)
	var hdrSender schema.UserID
	if h := m.Headers().Get(schema.HeaderSender); h != "" {
		if u, err := schema.ParseToken(h); err == nil {
			hdrSender = schema.UserID(u)
		}
	}

	lctx, cancel := context.WithTimeout(ctx, opTimeout)
	members, err := r.s.groups.Members(lctx, group)
	cancel()
	if err != nil {
		if !isContextErr(err) && r.s.isNoGroup != nil && r.s.isNoGroup(err) {
			log.Info("push skips a message of a missing group", "err", err)
			return nil, true
		}
		r.nak(ctx, log, m, meta, "members", err)
		return nil, false
	}
	var out []target
	for _, u := range members {
		if u == sender || (hdrSender != "" && u == hdrSender) || !u.Valid() {
			continue
		}
		var what string
		out, what, err = r.userTargets(ctx, u, msg, out)
		if err != nil {
			r.nak(ctx, log.with("user", u), m, meta, what, err)
			return nil, false
		}
	}
	return out, true
}

// userTargets appends to out the devices of user that get a push of msg:
// those with a live token that are not online. On error what names the
// failed lookup.
func (r *runner) userTargets(ctx context.Context, user schema.UserID, msg *schema.Message, out []target) (_ []target, what string, _ error) {
	devs, err := r.s.userDevices(ctx, user)
	if err != nil {
		return nil, "devices", err
	}
	live := func(d Device) bool { return d.Token != "" && !r.s.isDead(d.Token) }
	if !slices.ContainsFunc(devs, live) {
		return out, "", nil // the common case in a big group: no lookup, no allocation
	}
	lctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	online, err := r.s.presence.Online(lctx, user)
	if err != nil {
		return nil, "presence", err
	}
	for _, d := range devs {
		if live(d) && !slices.Contains(online, d.ID) {
			out = append(out, target{key: deviceKey{user, d.ID}, token: d.Token, msg: msg})
		}
	}
	return out, "", nil
}

// pushable reports whether m, stored for user, is pushed to user at all.
func pushable(m *schema.Message, user schema.UserID) bool {
	return pushableKind(m) && m.Source != string(user)
}

// pushableKind reports whether m is of a kind that is pushed: stored,
// MESSAGE or CUSTOM.
func pushableKind(m *schema.Message) bool {
	if m.Ephemeral {
		return false
	}
	return m.Type == schema.TypeMessage || m.Type == schema.TypeCustom
}

// isContextErr reports whether err is a cancellation or a deadline: never
// taken for a missing group.
func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// nak hands m back for redelivery after a lookup failure, with a delay
// growing with its deliveries (short when the failure is our shutdown).
func (r *runner) nak(ctx context.Context, log msgLog, m jetstream.Msg, meta *jetstream.MsgMetadata, what string, err error) {
	if ctx.Err() != nil {
		_ = m.NakWithDelay(shutdownNakDelay)
		return
	}
	delay := time.Second << min(meta.NumDelivered-1, 5)
	delay = min(delay, maxNakDelay)
	log.Warn("push lookup error", "lookup", what, "num_delivered", meta.NumDelivered, "retry_in", delay, "err", err)
	if meta.NumDelivered >= maxDeliver {
		log.Error("push lookup gave up", "lookup", what, "err", err)
	}
	_ = m.NakWithDelay(delay)
}

// enqueue adds message h to the batch of each target.
//
// The message a batch pushes (latest) is, within one stream, the one with
// the highest sequence; across the two streams, whose sequences are not
// comparable, the one that arrived last among those that are the newest of
// their stream in the batch. A burst mixing a user's INBOX and group
// messages therefore pushes the one looked up last.
func (r *runner) enqueue(h *held, targets []target) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, t := range targets {
		b, ok := r.pending[t.key]
		if !ok {
			b = &batch{key: t.key, deadline: time.Now().Add(r.s.window)}
			r.pending[t.key] = b
			r.order = append(r.order, b)
			if len(r.order) == 1 {
				select {
				case r.wake <- struct{}{}:
				default:
				}
			}
		}
		b.token = t.token
		b.count++
		b.msgs = append(b.msgs, h)
		h.refs++
		if k := h.key; k.seq > b.newest[k.stream] {
			b.newest[k.stream] = k.seq
			b.latest = t.msg
		}
	}
}

// flushLoop hands batches whose window ended to the send workers.
func (r *runner) flushLoop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		now := time.Now()
		var due []*batch
		var next time.Time
		r.mu.Lock()
		for len(r.order) > 0 && !r.order[0].deadline.After(now) {
			b := r.order[0]
			r.order[0] = nil
			r.order = r.order[1:]
			delete(r.pending, b.key)
			due = append(due, b)
		}
		if len(r.order) > 0 {
			next = r.order[0].deadline
		}
		r.mu.Unlock()

		for _, b := range due {
			select {
			case r.ready <- b:
			case <-ctx.Done():
				return // the rest is abandoned
			}
		}
		if len(due) > 0 {
			continue
		}
		var fire <-chan time.Time
		if !next.IsZero() {
			timer.Reset(time.Until(next))
			fire = timer.C
		}
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-fire:
		}
	}
}

// sendLoop sends batches until ctx ends.
func (r *runner) sendLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-r.ready:
			if r.send(ctx, b) {
				r.release(b.msgs)
			}
		}
	}
}

// send pushes one batch. It returns false if it was interrupted by shutdown
// (the batch's messages must then be redelivered).
func (r *runner) send(ctx context.Context, b *batch) bool {
	s := r.s
	log := s.log.With("user", b.key.user, "device", b.key.device, "msg_id", b.latest.ID, "count", b.count)
	if s.isDead(b.token) {
		return true
	}
	if r.nowOnline(ctx, b.key) {
		return true
	}
	n := Notification{
		Token:       b.token,
		Data:        map[string]string{DataMessage: string(schema.RenderJSON(b.latest))},
		CollapseKey: collapseKey(b.latest),
		TTL:         s.ttl,
	}
	if b.count > 1 {
		n.Data[DataCount] = strconv.Itoa(b.count)
		s.coalesced.Add(uint64(b.count - 1))
	}
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, sendTimeout)
		err := s.sender.Send(actx, n)
		cancel()
		if err == nil {
			s.sent.Add(1)
			log.Debug("push sent", "attempt", attempt)
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if errors.Is(err, ErrTokenInvalid) {
			r.dropToken(ctx, log, b, err)
			return true
		}
		var re *RetryableError
		if !errors.As(err, &re) && !errors.Is(err, context.DeadlineExceeded) {
			s.failed.Add(1)
			log.Warn("push failed", "attempt", attempt, "err", err)
			return true
		}
		delay := firstRetryDelay << min(attempt-1, 16)
		if re != nil && re.After > 0 {
			delay = re.After
		}
		if attempt >= s.maxAttempts || delay > maxRetryDelay {
			s.failed.Add(1)
			log.Warn("push gave up", "attempt", attempt, "retry_after", delay, "err", err)
			return true
		}
		s.retried.Add(1)
		log.Info("push retry", "attempt", attempt, "retry_in", delay, "err", err)
		t := time.NewTimer(min(delay, maxRetryDelay))
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
	}
}

// nowOnline reports whether the device connected while its push waited. A
// presence failure counts as offline: better a push too many than none.
func (r *runner) nowOnline(ctx context.Context, k deviceKey) bool {
	lctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	online, err := r.s.presence.Online(lctx, k.user)
	return err == nil && slices.Contains(online, k.device)
}

func (r *runner) dropToken(ctx context.Context, log *slog.Logger, b *batch, cause error) {
	s := r.s
	s.markDead(b.token)
	// The removal finishes even when shutdown starts meanwhile.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opTimeout)
	defer cancel()
	if err := s.devices.RemoveToken(rctx, b.key.user, b.key.device, b.token); err != nil {
		log.Warn("push token removal error", "reason", cause, "err", err)
		return
	}
	s.tokensRemoved.Add(1)
	log.Info("push token removed", "reason", cause)
}

// collapseKey is the conversation of m: the group for group messages, else
// the sender.
func collapseKey(m *schema.Message) string {
	if m.Channel == schema.ChannelGroup {
		return m.Destination
	}
	return m.Source
}

// release drops one reference from each message and acks those that are done.
func (r *runner) release(hs []*held) {
	var done []jetstream.Msg
	r.mu.Lock()
	for _, h := range hs {
		h.refs--
		if h.refs == 0 {
			delete(r.held, h.key)
			done = append(done, h.msg)
		}
	}
	r.mu.Unlock()
	for _, m := range done {
		if err := m.Ack(); err != nil {
			r.s.log.Warn("push ack error", "subject", m.Subject(), "err", err)
		}
	}
}

// keepAlive extends the ack wait of the held messages, so coalescing, slow
// providers and retries do not cause redeliveries.
func (r *runner) keepAlive(ctx context.Context) {
	t := time.NewTicker(r.s.ackWait / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.mu.Lock()
		msgs := make([]jetstream.Msg, 0, len(r.held))
		for _, h := range r.held {
			msgs = append(msgs, h.msg)
		}
		r.mu.Unlock()
		for _, m := range msgs {
			_ = m.InProgress()
		}
	}
}

// releaseAll hands every message still held or queued back to the server
// for redelivery. Run calls it after the consumer and all workers stopped.
func (r *runner) releaseAll(in <-chan jetstream.Msg) {
	for drained := false; !drained; {
		select {
		case m := <-in:
			_ = m.NakWithDelay(shutdownNakDelay)
		default:
			drained = true
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, h := range r.held {
		_ = h.msg.NakWithDelay(shutdownNakDelay)
		delete(r.held, k)
	}
	clear(r.pending)
	r.order = nil
}
