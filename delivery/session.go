package delivery

import (
	"cmp"
	"context"
	"crypto/rand"
	mrand "math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

// Sink is the connection a session writes to (implemented by the gateway).
// Both methods are called from the session's worker goroutine (one at a time).
type Sink interface {
	// Deliver enqueues one message without blocking; false means the
	// outbound queue is full (a slow consumer).
	Deliver(m *schema.Message) bool
	// Close asks the connection to close with a WebSocket close code
	// (CloseLoggedOut, CloseReplaced, CloseSlowConsumer, CloseGoingAway). It
	// must not block; it is called at most once.
	Close(code int, reason string)
}

// Session delivers one user's inbox to one device connection. Its state is
// owned by its worker goroutine, which exists only while there is work: a
// signal (a live message, acks, a close, a due timer) starts it unless it
// runs, and it exits when nothing is pending, so an idle session costs no
// goroutine. At most one worker runs at a time; Ack and Close only signal it.
type Session struct {
	s       *Service
	id      string
	user    schema.UserID
	device  schema.DeviceID
	subject string // the user's INBOX subject
	sink    Sink
	ctx     context.Context // Run's context
	done    chan struct{}
	rev     atomic.Uint64 // revision of this session's presence write

	mu          sync.Mutex
	inq         []*nats.Msg // live messages from the dispatcher, bounded
	inqBytes    int
	overflow    bool // live messages were lost: re-read the stream
	acks        []string
	closing     bool
	closeCode   int
	closeReason string
	flushed     *flushResult // outcome of the background cursor write, for the worker
	ready       bool         // Open has loaded the cursor: the worker may start
	woken       bool         // work is pending for the worker
	working     bool         // the worker goroutine runs
	finished    bool         // the last worker has finished: start no other

	// Owned by the worker goroutine (one at a time; handed over under mu).
	floor     uint64              // every seq <= floor is acked by the device
	next      uint64              // highest seq handed to the sink (or skipped as acked)
	acked     map[uint64]struct{} // acked seqs above floor
	flight    []inflight          // delivered, unacked; ascending seq
	behind    bool                // the stream may hold messages after next not yet sent
	dirty     bool                // cursor changed since the last flush
	forgotten bool                // the device's cursor was dropped (logout)
	lastFlush time.Time
	lastPurge time.Time
	unpurged  int       // acks applied since the last purge
	purgeDue  bool      // a flush skipped its purge (too soon after the last): purge at lastPurge+purgeEvery
	retryAt   time.Time // after a read error: when to read again
	backoff   time.Duration
	timer     *time.Timer // signals the worker when the next redelivery, flush or retry is due
	spareQ    []*nats.Msg
	spareAcks []string
	flushing  bool          // a background cursor write (or purge) runs
	bgDone    chan struct{} // closed when it ends
}

// flushResult is the outcome of a background cursor write.
type flushResult struct {
	wrote  bool          // a cursor write (not only a purge) ran
	err    error         // the write failed: the cursor is still dirty
	merged *deviceCursor // the stored cursor after the write; nil: forgotten
	purged bool          // the write also purged
	urgent bool          // its purge was urgent (purgeAcks reached)
	// purgeSkipped: a purge-only run found the node busy purging.
	purgeSkipped bool
}

type inflight struct {
	seq  uint64
	id   string
	sent time.Time
}

func newSession(s *Service, user schema.UserID, device schema.DeviceID, sink Sink) *Session {
	return &Session{
		s:       s,
		id:      rand.Text(),
		user:    user,
		device:  device,
		subject: schema.UserInbox(user),
		sink:    sink,
		done:    make(chan struct{}),
		// The first purge waits purgeEvery too, and up to half as long
		// again at random, so sessions that connected together (a
		// reconnect storm) do not purge together.
		lastPurge: time.Now().Add(mrand.N(s.purgeEvery/2 + 1)),
	}
}

// ID returns the session id (published in kicks, stored in presence).
func (ss *Session) ID() string { return ss.id }

// init loads the device cursor; catch-up starts after it.
func (ss *Session) init(c deviceCursor) {
	ss.floor, ss.next = c.Floor, c.Floor
	for _, q := range c.Acked {
		if q > c.Floor {
			if ss.acked == nil {
				ss.acked = make(map[uint64]struct{}, len(c.Acked))
			}
			ss.acked[q] = struct{}{}
		}
	}
	ss.behind = true
	ss.lastFlush = time.Now()
}

// signal marks work pending and starts the worker unless it runs.
func (ss *Session) signal() {
	ss.mu.Lock()
	ss.woken = true
	ss.startLocked()
	ss.mu.Unlock()
}

// startLocked starts the worker if work is pending, none runs, Open is done
// and the session has not finished.
func (ss *Session) startLocked() {
	if !ss.woken || ss.working || !ss.ready || ss.finished {
		return
	}
	ss.working = true
	go ss.run()
}

// start lets the worker run (called once by Open after init) and starts it
// for the catch-up.
func (ss *Session) start() {
	ss.mu.Lock()
	ss.ready, ss.woken = true, true
	ss.startLocked()
	ss.mu.Unlock()
}

// push queues a live message (called by the dispatcher; never blocks).
func (ss *Session) push(m *nats.Msg) {
	ss.mu.Lock()
	switch {
	case ss.closing:
	case len(ss.inq) >= ss.s.queueMsgs || ss.inqBytes+len(m.Data) > ss.s.queueBytes:
		ss.overflow = true
	default:
		ss.inq = append(ss.inq, m)
		ss.inqBytes += len(m.Data)
	}
	ss.mu.Unlock()
	ss.signal()
}

// markGap makes the session re-read the stream after its position.
func (ss *Session) markGap() {
	ss.mu.Lock()
	ss.overflow = true
	ss.mu.Unlock()
	ss.signal()
}

// Ack records CLIENT_ACKs (message ids) from the device. Every in-flight
// message with one of the ids is acked. It does not block.
func (ss *Session) Ack(ids ...string) {
	ss.mu.Lock()
	if !ss.closing {
		room := ss.s.maxAckPending - len(ss.acks)
		if len(ids) > room {
			ids = ids[:max(room, 0)] // the dropped ones are redelivered
		}
		ss.acks = append(ss.acks, ids...)
	}
	ss.mu.Unlock()
	ss.signal()
}

// Close ends the session: it flushes the cursor, deregisters presence and
// returns when that is done. It is idempotent. It must not be called from
// within the Sink's methods.
func (ss *Session) Close() {
	ss.terminate(0, "")
	<-ss.done
}

// terminate asks the session to end; code != 0 closes the sink with it.
func (ss *Session) terminate(code int, reason string) {
	ss.mu.Lock()
	if !ss.closing {
		ss.closing, ss.closeCode, ss.closeReason = true, code, reason
	}
	ss.mu.Unlock()
	ss.signal()
}

// run is the worker: it steps while work is pending and exits when there is
// none (the timer or the next signal starts a new one), or runs finish when
// the session ends. Run's shutdown terminates every session, so the worker
// does not watch Run's context.
func (ss *Session) run() {
	for {
		ss.mu.Lock()
		if !ss.woken {
			ss.working = false
			ss.trimLocked()
			ss.mu.Unlock()
			return
		}
		ss.woken = false
		ss.mu.Unlock()
		if !ss.step() {
			ss.finish()
			return
		}
		ss.arm()
	}
}

// step handles everything pending; false ends the session.
func (ss *Session) step() bool {
	ss.mu.Lock()
	q, acks, over, closing, flushed := ss.inq, ss.acks, ss.overflow, ss.closing, ss.flushed
	ss.inq, ss.acks, ss.overflow, ss.inqBytes, ss.flushed = ss.spareQ[:0], ss.spareAcks[:0], false, 0, nil
	ss.mu.Unlock()
	if flushed != nil {
		ss.applyFlush(flushed)
	}
	defer func() {
		clear(q)
		clear(acks)
		ss.spareQ, ss.spareAcks = q, acks
	}()
	if len(acks) > 0 {
		ss.applyAcks(acks) // also when closing: the final flush records them
	}
	if closing {
		return false
	}
	if over {
		ss.behind = true
	}
	for _, m := range q {
		if !ss.live(m) {
			return false
		}
	}
	now := time.Now()
	if len(ss.flight) > 0 && !now.Before(ss.flight[ss.oldest()].sent.Add(ss.s.cfg.AckTimeout)) {
		if !ss.redeliver(now) {
			return false
		}
	}
	if ss.behind && ss.refill() && !now.Before(ss.retryAt) {
		if !ss.fill() {
			return false
		}
	}
	if ss.dirty && !ss.flushing && !now.Before(ss.lastFlush.Add(ss.s.cfg.CursorFlush)) {
		ss.flushAsync()
	}
	if ss.purgeDue && !ss.dirty && !ss.flushing && !now.Before(ss.lastPurge.Add(ss.s.purgeEvery)) {
		ss.purgeAsync()
	}
	return true
}

// trimLocked drops the buffers an idle session does not need (they keep
// the capacity of the last burst otherwise). Called by the exiting worker.
func (ss *Session) trimLocked() {
	if len(ss.inq) == 0 {
		ss.inq = nil
	}
	if len(ss.acks) == 0 {
		ss.acks = nil
	}
	ss.spareQ, ss.spareAcks = nil, nil
	if len(ss.flight) == 0 {
		ss.flight = nil
	}
	if len(ss.acked) == 0 {
		ss.acked = nil
	}
}

// refill reports whether the window has room enough for a stream read: it
// is empty or at least half free, so a client acking one message at a time
// does not cause one read per message.
func (ss *Session) refill() bool {
	room := ss.s.cfg.MaxInFlight - len(ss.flight)
	return len(ss.flight) == 0 || (room > 0 && 2*room >= ss.s.cfg.MaxInFlight)
}

// arm sets the timer for the next redelivery, flush or read retry; with
// nothing pending the timer stays off.
func (ss *Session) arm() {
	var due time.Time
	earlier := func(t time.Time) {
		if due.IsZero() || t.Before(due) {
			due = t
		}
	}
	if len(ss.flight) > 0 {
		earlier(ss.flight[ss.oldest()].sent.Add(ss.s.cfg.AckTimeout))
	}
	if ss.dirty {
		earlier(ss.lastFlush.Add(ss.s.cfg.CursorFlush))
	}
	if ss.behind && !ss.retryAt.IsZero() {
		earlier(ss.retryAt)
	}
	if ss.purgeDue && !ss.dirty {
		earlier(ss.lastPurge.Add(ss.s.purgeEvery))
	}
	switch {
	case due.IsZero():
		if ss.timer != nil {
			ss.timer.Stop()
		}
	case ss.timer == nil:
		ss.timer = time.AfterFunc(time.Until(due), ss.signal)
	default:
		ss.timer.Reset(time.Until(due))
	}
}

// oldest returns the index of the in-flight message sent longest ago.
func (ss *Session) oldest() int {
	j := 0
	for i := 1; i < len(ss.flight); i++ {
		if ss.flight[i].sent.Before(ss.flight[j].sent) {
			j = i
		}
	}
	return j
}

// live handles one message from the live subject.
func (ss *Session) live(m *nats.Msg) bool {
	seqHdr := m.Header.Get(schema.HeaderSequence)
	if seqHdr == "" {
		// Ephemeral: deliver, never track.
		msg, err := schema.UnmarshalProto(m.Data)
		if err != nil {
			ss.s.log.Warn("undecodable ephemeral message", "user", ss.user, "err", err)
			return true
		}
		if !ss.sink.Deliver(msg) {
			ss.slowConsumer()
			return false
		}
		ss.s.metrics.delivered.Inc()
		return true
	}
	seq, err := strconv.ParseUint(seqHdr, 10, 64)
	if err != nil {
		ss.s.log.Warn("bad live sequence header", "user", ss.user, "err", err)
		return true
	}
	last, _ := strconv.ParseUint(m.Header.Get(schema.HeaderLastSeq), 10, 64)
	switch {
	case seq <= ss.next: // already sent (or skipped)
		return true
	case ss.behind: // the stream read will reach it
		return true
	case last > ss.next: // a gap: read the missing range first
		ss.behind = true
		return true
	case len(ss.flight) >= ss.s.cfg.MaxInFlight: // window full: read it later
		ss.behind = true
		return true
	}
	return ss.send(seq, m.Data)
}

// send hands the stored message seq to the sink and tracks it.
func (ss *Session) send(seq uint64, data []byte) bool {
	if _, ok := ss.acked[seq]; ok {
		ss.next = seq
		return true
	}
	msg, err := schema.UnmarshalProto(data)
	if err != nil {
		// Poison: it will never decode. Count it as acked so it does not
		// hold the floor (and the inbox) forever.
		ss.s.log.Error("undecodable inbox message skipped", "user", ss.user, "seq", seq, "err", err)
		ss.next = seq
		ss.markAcked(seq)
		ss.advance()
		return true
	}
	if !ss.sink.Deliver(msg) {
		ss.slowConsumer()
		return false
	}
	ss.s.metrics.delivered.Inc()
	ss.next = seq
	ss.flight = append(ss.flight, inflight{seq: seq, id: msg.ID, sent: time.Now()})
	return true
}

func (ss *Session) slowConsumer() {
	ss.s.log.Info("slow consumer", "user", ss.user, "device", ss.device, "conn_id", ss.id)
	ss.terminate(CloseSlowConsumer, "slow consumer")
}

// fill reads the stream after next into the window until the window is full
// or the stream has no more.
func (ss *Session) fill() bool {
	dead, full := false, false
	room := ss.s.cfg.MaxInFlight - len(ss.flight)
	end, err := ss.s.scan(ss.ctx, ss.subject, ss.next+1, min(room, 256), func(m *jetstream.RawStreamMsg) bool {
		if m.Sequence <= ss.next {
			return true
		}
		if len(ss.flight) >= ss.s.cfg.MaxInFlight {
			full = true
			return false
		}
		if !ss.send(m.Sequence, m.Data) {
			dead = true
			return false
		}
		return true
	})
	if dead {
		return false
	}
	if err != nil {
		if ss.ctx.Err() == nil {
			ss.backoff = min(max(2*ss.backoff, 100*time.Millisecond), 5*time.Second)
			ss.retryAt = time.Now().Add(ss.backoff)
			ss.s.log.Warn("inbox read", "user", ss.user, "device", ss.device, "err", err)
		}
		return true
	}
	ss.backoff, ss.retryAt = 0, time.Time{}
	if end && !full {
		ss.behind = false
	}
	ss.advance() // skipped (already acked) messages may move the floor
	return true
}

// redeliver sends again every in-flight message sent at least AckTimeout
// ago, in order, reading it from the stream.
func (ss *Session) redeliver(now time.Time) bool {
	cut := now.Add(-ss.s.cfg.AckTimeout)
	var due []uint64
	for i := range ss.flight {
		if !ss.flight[i].sent.After(cut) {
			due = append(due, ss.flight[i].seq)
			ss.flight[i].sent = now // at most once per AckTimeout, even if the read fails
		}
	}
	if len(due) == 0 {
		return true
	}
	last := due[len(due)-1]
	seen := make(map[uint64]bool, len(due))
	dead := false
	_, err := ss.s.scan(ss.ctx, ss.subject, due[0], min(len(ss.flight)+len(ss.acked), 256), func(m *jetstream.RawStreamMsg) bool {
		if m.Sequence > last {
			return false
		}
		if _, ok := slices.BinarySearch(due, m.Sequence); !ok {
			return true
		}
		seen[m.Sequence] = true
		msg, err := schema.UnmarshalProto(m.Data)
		if err != nil {
			return true // cannot happen: it decoded when first sent
		}
		if !ss.sink.Deliver(msg) {
			dead = true
			return false
		}
		ss.s.metrics.redelivered.Inc()
		return true
	})
	if dead {
		ss.slowConsumer()
		return false
	}
	if err != nil {
		if ss.ctx.Err() == nil {
			ss.s.log.Warn("inbox read for redelivery", "user", ss.user, "device", ss.device, "err", err)
		}
		return true
	}
	// Due messages no longer in the stream expired (MaxAge): nothing left to
	// deliver, so they count as acked.
	gone := false
	for _, q := range due {
		if !seen[q] {
			ss.markAcked(q)
			gone = true
		}
	}
	if gone {
		ss.advance()
	}
	return true
}

// applyAcks acks every in-flight message whose id is in ids.
func (ss *Session) applyAcks(ids []string) {
	n := 0
	for _, id := range ids {
		for i := 0; i < len(ss.flight); {
			if ss.flight[i].id == id {
				ss.markAcked(ss.flight[i].seq)
				n++
				continue // markAcked removed flight[i]
			}
			i++
		}
	}
	if n > 0 {
		ss.unpurged += n
		ss.s.metrics.acks.Add(float64(n))
		ss.advance()
	}
}

// markAcked records seq as acked and drops it from the window.
func (ss *Session) markAcked(seq uint64) {
	if i, ok := slices.BinarySearchFunc(ss.flight, seq, func(f inflight, q uint64) int {
		return cmp.Compare(f.seq, q)
	}); ok {
		ss.flight = slices.Delete(ss.flight, i, i+1)
	}
	if seq > ss.floor {
		if ss.acked == nil {
			ss.acked = make(map[uint64]struct{})
		}
		ss.acked[seq] = struct{}{}
	}
	ss.dirty = true
}

// advance moves the floor over everything acked: up to just below the
// oldest in-flight message, or to next when nothing is in flight.
func (ss *Session) advance() {
	f := ss.next
	if len(ss.flight) > 0 {
		f = ss.flight[0].seq - 1
	}
	if f <= ss.floor {
		return
	}
	ss.setFloor(f)
	ss.dirty = true
}

func (ss *Session) setFloor(f uint64) {
	ss.floor = f
	for q := range ss.acked {
		if q <= f {
			delete(ss.acked, q)
		}
	}
}

// cursor returns the session's position as a deviceCursor.
func (ss *Session) cursor() *deviceCursor {
	c := &deviceCursor{Floor: ss.floor, Seen: time.Now().UnixMilli()}
	if len(ss.acked) > 0 {
		c.Acked = make([]uint64, 0, len(ss.acked))
		for q := range ss.acked {
			c.Acked = append(c.Acked, q)
		}
		slices.Sort(c.Acked)
	}
	return c
}

// Cursor writes: the worker writes the device cursor at most every
// Config.CursorFlush while it changes, merging what other writers (a REST
// ack, an overlapping session on another node) recorded, and purges what
// every device has acked: at the session's end, and while it runs at most
// every Service.purgeEvery, 1 minute (a purge is an fsynced write that
// walks the stream's blocks for the user's subject; one per flush of every
// busy session cost more than the deliveries themselves: 25% of the CPU in
// a 1,000-member group benchmark). A purge skipped for that reason runs
// when purgeEvery has passed (purgeAsync), so the last acks of a burst are
// purged too.
//
// While the session runs, the write (a KV read and a compare-and-swap
// write) goes on in a goroutine of its own, one at a time, so delivery
// never waits for it: with 1,000 sessions flushing once a second, waiting
// cost group messages hundreds of milliseconds. The worker applies the
// outcome on its next step (applyFlush). The final write at the session's
// end is synchronous (flush).

// flushAsync starts a background write of the cursor as it is now.
func (ss *Session) flushAsync() {
	ss.lastFlush = time.Now()
	if ss.forgotten {
		ss.dirty = false
		return
	}
	mine := ss.cursor()
	ss.dirty = false
	// Acked mail still counts against the inbox cap until it is purged:
	// a device that reads a lot purges sooner than purgeEvery.
	urgent := ss.unpurged >= ss.s.purgeAcks
	purge := urgent || time.Since(ss.lastPurge) >= ss.s.purgeEvery
	if purge {
		ss.lastPurge, ss.purgeDue, ss.unpurged = time.Now(), false, 0
	}
	ss.background(func(ctx context.Context) flushResult { return ss.writeCursor(ctx, mine, purge, urgent) })
}

// purgeAsync starts the purge a flush skipped, on the current cursors.
func (ss *Session) purgeAsync() {
	ss.lastPurge, ss.purgeDue, ss.unpurged = time.Now(), false, 0 // retried after purgeEvery if it fails
	ss.background(func(ctx context.Context) flushResult {
		a, err := ss.s.getAssets()
		if err != nil {
			return flushResult{}
		}
		doc, _, err := cas(ctx, ss.s.log, a.cursors, schema.Token(ss.user), func(*cursorDoc, bool) casOp { return casNone })
		if err != nil {
			ss.s.log.Warn("inbox purge", "user", ss.user, "err", err)
			return flushResult{}
		}
		ran, err := ss.s.tryPurge(ctx, a, ss.user, doc, false)
		if err != nil {
			ss.s.log.Warn("inbox purge", "user", ss.user, "err", err)
		}
		return flushResult{purgeSkipped: !ran}
	})
}

// background runs op in a goroutine and hands its result to the worker.
func (ss *Session) background(op func(context.Context) flushResult) {
	ss.flushing = true
	done := make(chan struct{})
	ss.bgDone = done
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ss.ctx), ss.s.opTimeout)
		res := op(ctx)
		cancel()
		ss.mu.Lock()
		ss.flushed = &res
		ss.mu.Unlock()
		ss.signal()
	}()
}

// applyFlush applies the outcome of a background write to the worker's
// state.
func (ss *Session) applyFlush(res *flushResult) {
	ss.flushing, ss.bgDone = false, nil
	switch {
	case !res.wrote:
		if res.purgeSkipped {
			ss.purgeDue = true // again after purgeEvery
		}
	case res.err != nil:
		ss.dirty = true // write it again after CursorFlush
	case res.merged == nil:
		ss.forgotten = true
	default:
		ss.adopt(res.merged)
		if !res.purged {
			ss.purgeDue = true // else nothing would purge what this write recorded
		}
		if res.urgent && !res.purged {
			ss.unpurged = max(ss.unpurged, ss.s.purgeAcks) // still urgent: the next write tries again
		}
	}
}

// waitBackground waits for a background write and applies its outcome.
func (ss *Session) waitBackground() {
	if ss.bgDone == nil {
		return
	}
	<-ss.bgDone
	ss.mu.Lock()
	res := ss.flushed
	ss.flushed = nil
	ss.mu.Unlock()
	if res != nil {
		ss.applyFlush(res)
	}
}

// writeCursor merges mine into the stored cursor of the device and, if
// purge, purges what every device has acked. It touches no worker state.
func (ss *Session) writeCursor(ctx context.Context, mine *deviceCursor, purge, urgent bool) flushResult {
	res := flushResult{wrote: true, urgent: urgent}
	a, err := ss.s.getAssets()
	if err != nil {
		res.err = err
		return res
	}
	doc, err := ss.s.updateCursor(ctx, a, ss.user, func(d *cursorDoc) bool {
		c := d.Devices[string(ss.device)]
		if c == nil {
			res.merged = nil
			return false // forgotten: do not bring it back
		}
		c.merge(mine)
		res.merged = &deviceCursor{Floor: c.Floor, Acked: slices.Clone(c.Acked)}
		return true
	})
	if err != nil {
		ss.s.log.Warn("cursor flush", "user", ss.user, "device", ss.device, "err", err)
		res.err = err
		return res
	}
	if res.merged != nil && purge {
		ran, err := ss.s.tryPurge(ctx, a, ss.user, doc, urgent)
		if err != nil {
			ss.s.log.Warn("inbox purge", "user", ss.user, "err", err)
		}
		res.purged = ran // skipped when the node is busy purging: purgeDue
	}
	return res
}

// flush writes the cursor now, purging too: the session's final write.
func (ss *Session) flush(ctx context.Context) {
	ss.lastFlush = time.Now()
	if ss.forgotten {
		ss.dirty = false
		return
	}
	ss.lastPurge, ss.purgeDue = time.Now(), false
	ctx, cancel := context.WithTimeout(ctx, ss.s.opTimeout)
	defer cancel()
	res := ss.writeCursor(ctx, ss.cursor(), true, ss.unpurged >= ss.s.purgeAcks)
	ss.dirty = res.err != nil
	switch {
	case res.err != nil:
	case res.merged == nil:
		ss.forgotten = true
	default:
		ss.adopt(res.merged)
	}
}

// purgeNow runs a skipped purge now: at the session's end.
func (ss *Session) purgeNow(ctx context.Context) {
	ss.lastPurge, ss.purgeDue = time.Now(), false
	a, err := ss.s.getAssets()
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, ss.s.opTimeout)
	defer cancel()
	doc, _, err := cas(ctx, ss.s.log, a.cursors, schema.Token(ss.user), func(*cursorDoc, bool) casOp { return casNone })
	if err != nil {
		ss.s.log.Warn("inbox purge", "user", ss.user, "err", err)
		return
	}
	// A busy node skips it: the user's next session purges.
	if _, err := ss.s.tryPurge(ctx, a, ss.user, doc, false); err != nil {
		ss.s.log.Warn("inbox purge", "user", ss.user, "err", err)
	}
}

// adopt applies acks recorded by others to the session.
func (ss *Session) adopt(c *deviceCursor) {
	for i := 0; i < len(ss.flight); {
		q := ss.flight[i].seq
		if _, ok := slices.BinarySearch(c.Acked, q); ok || q <= c.Floor {
			ss.flight = slices.Delete(ss.flight, i, i+1)
			continue
		}
		i++
	}
	for _, q := range c.Acked {
		if q > ss.floor {
			if ss.acked == nil {
				ss.acked = make(map[uint64]struct{})
			}
			ss.acked[q] = struct{}{}
		}
	}
	if c.Floor > ss.next {
		ss.next = c.Floor
	}
	if c.Floor > ss.floor {
		ss.setFloor(c.Floor)
	}
	ss.advance()
}

// finish runs in the last worker when the session ends: close the sink if asked,
// flush the cursor, deregister.
func (ss *Session) finish() {
	ss.mu.Lock()
	ss.closing, ss.finished = true, true
	code, reason := ss.closeCode, ss.closeReason
	acks := ss.acks
	ss.inq, ss.acks = nil, nil
	ss.mu.Unlock()
	if len(acks) > 0 {
		ss.applyAcks(acks) // arrived while the last step ran
	}
	if code != 0 {
		ss.sink.Close(code, reason)
	}
	if ss.timer != nil {
		ss.timer.Stop()
	}
	ss.waitBackground()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ss.ctx), ss.s.closeTimeout)
	defer cancel()
	switch {
	case ss.dirty:
		ss.flush(ctx)
	case ss.purgeDue:
		ss.purgeNow(ctx)
	}
	if a, err := ss.s.getAssets(); err == nil {
		if err := ss.s.presenceRemove(ctx, a, ss); err != nil {
			ss.s.log.Warn("presence", "user", ss.user, "device", ss.device, "err", err)
		}
	}
	ss.s.metrics.sessions.Dec()
	ss.s.unregister(ss)
	close(ss.done)
	ss.s.wg.Done()
}
