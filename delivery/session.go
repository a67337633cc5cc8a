package delivery

import (
	"cmp"
	"context"
	"crypto/rand"
	"iter"
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
// Both methods are called one at a time, from the session's worker or, for
// a live message to an idle session, from the node's dispatcher: neither may
// block, or every session on the node waits.
type Sink interface {
	// Deliver enqueues one message without blocking; false means the
	// outbound queue is full (a slow consumer). m is not modified after
	// the call: the dispatcher hands one decoded group message to every
	// member's sink, and a sink may share its encoding between them.
	Deliver(m *schema.Message) bool
	// Close asks the connection to close with a WebSocket close code
	// (CloseLoggedOut, CloseReplaced, CloseSlowConsumer, CloseGoingAway). It
	// must not block; it is called at most once.
	Close(code int, reason string)
}

// Flusher is a Sink that may hold frames back so that several share a
// socket write (the gateway's WriteCoalesce holds frames to a busy socket).
// A session calls Flush after handing it messages read from a stream (a
// catch-up or a redelivery): the next ones come when the device acks
// these, so holding them would only add a wait to every round.
type Flusher interface {
	Flush()
}

// Session delivers one user's inbox to one device connection. Its state is
// owned by its worker goroutine, which exists only while there is work: a
// signal (a live message, acks, a close, a due timer) starts it unless it
// runs, and it exits when nothing is pending, so an idle session costs no
// goroutine. At most one worker runs at a time; Ack and Close only signal it.
type Session struct {
	s      *Service
	id     string
	user   schema.UserID
	device schema.DeviceID
	sink   Sink
	ctx    context.Context // Run's context
	done   chan struct{}
	rev    atomic.Uint64 // revision of this session's presence write

	mu          sync.Mutex
	inq         []liveMsg // live messages from the dispatcher, bounded
	acks        []string
	closeReason string
	flushed     *flushResult // outcome of the background cursor write, for the worker
	inqBytes    int32        // bounded by Service.queueBytes
	closeCode   int16        // a WebSocket close code
	overflow    bool         // live messages were lost: re-read the streams
	closing     bool
	ready       bool // Open has loaded the cursor: the worker may start
	woken       bool // work is pending for the worker
	working     bool // the worker goroutine runs
	finished    bool // the last worker has finished: start no other

	// Owned by the worker goroutine (one at a time; handed over under mu).
	// (Fields are ordered to pack: an idle session's size matters.)
	inbox     lane       // the user's INBOX subject
	groups    []*lane    // the user's GROUP_LOG subjects (ADR 4)
	gs        *groupsAux // the rest of the group state; nil until needed
	inFlight  int        // delivered, unacked messages over all lanes
	lastFlush mono       // when the cursor was last written
	dueAt     mono       // no redelivery is due before (0: nothing in flight); see arm
	armedAt   mono       // when the timer fires (0: stopped)
	lastPurge time.Time
	unpurged  int         // inbox acks applied since the last purge
	timer     *time.Timer // signals the worker when the next redelivery, flush or retry is due
	spareQ    []liveMsg
	spareAcks []string
	bgDone    chan struct{} // closed when the background cursor write ends
	stale     bool          // memberships must be (re)loaded: at start, after a group event
	dirty     bool          // cursor changed since the last flush
	forgotten bool          // the device's cursor was dropped (logout)
	purgeDue  bool          // a flush skipped its purge (too soon after the last): purge at lastPurge+purgeEvery
	flushing  bool          // a background cursor write (or purge) runs
	// fromStream: this step handed the sink messages read from a stream
	// (see Flusher).
	fromStream bool
	// lagging: live messages were lost (the queue overflowed, or a gap)
	// and the session is re-reading the streams; counted in
	// Service.lagging until it has caught up (see Service.Overloaded).
	lagging bool
}

// groupsAux is the part of a session's group state that most sessions
// never need, allocated on first use.
type groupsAux struct {
	cur       map[string]*laneCursor // stored group cursors not (or no longer) lanes
	refreshAt time.Time              // after a failed membership load: when to try again
	refreshBo time.Duration          // its backoff
	dropped   []schema.GroupID       // groups gone since the last cursor write: forget their cursors
}

// aux returns ss.gs, allocating it.
func (ss *Session) aux() *groupsAux {
	if ss.gs == nil {
		ss.gs = &groupsAux{}
	}
	return ss.gs
}

// mono is a point in time as nanoseconds of the monotonic clock since the
// process started (0: none): a third of a time.Time, which matters in a
// struct kept per idle connection.
type mono int64

var epoch = time.Now()

func monoNow() mono { return mono(time.Since(epoch)) }

// monoOf converts t (0 for the zero time).
func monoOf(t time.Time) mono {
	if t.IsZero() {
		return 0
	}
	return mono(t.Sub(epoch))
}

// time converts m back (the zero time for 0).
func (m mono) time() time.Time {
	if m == 0 {
		return time.Time{}
	}
	return epoch.Add(time.Duration(m))
}

func (m mono) add(d time.Duration) time.Time { return epoch.Add(time.Duration(m) + d) }

// liveMsg is a live message queued for a session; dec is its decoded
// payload when the dispatcher decoded it once for every member of a group;
// at is when the dispatcher handed it over (this node's clock).
type liveMsg struct {
	m   *nats.Msg
	dec *schema.Message
	at  mono
	liveSeq
}

// liveSeq is a republished message's stream sequence and the sequence of
// its subject's previous message (Nats-Sequence, Nats-Last-Sequence). The
// dispatcher reads them once for all of a group's sessions (and its
// latest messages, see recent) instead of each session parsing the same
// headers again. has is false for a message without a sequence
// (ephemeral); bad for one whose sequence does not parse.
type liveSeq struct {
	seq, last uint64
	has, bad  bool
}

// readLiveSeq reads the sequences of a live message's headers.
func readLiveSeq(h nats.Header) liveSeq {
	v := h.Get(schema.HeaderSequence)
	if v == "" {
		return liveSeq{}
	}
	seq, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return liveSeq{has: true, bad: true}
	}
	last, _ := strconv.ParseUint(h.Get(schema.HeaderLastSeq), 10, 64)
	return liveSeq{seq: seq, last: last, has: true}
}

// lane is one ordered source of a session's messages: the user's INBOX
// subject, or the GROUP_LOG subject of one of the user's groups. Each has
// its own position and window; the window bound (Config.MaxInFlight) is
// over all lanes.
type lane struct {
	subject string              // its subject in the stream
	live    string              // the core subject its live messages arrive on
	group   schema.GroupID      // "" for the inbox
	member  *schema.Membership  // group lanes: the sequences the user may see
	floor   uint64              // every seq <= floor is acked by the device
	next    uint64              // highest seq handed to the sink (or skipped)
	acked   map[uint64]struct{} // acked seqs above floor
	flight  []inflight          // delivered, unacked; ascending seq
	retryAt time.Time           // after a read error: when to read again
	backoff time.Duration
	behind  bool // the stream may hold messages after next not yet sent
	joined  bool // group lanes: subscribed to live
	ended   bool // group lanes: membership over and read to its end
}

// stream returns the lane's stream.
func (l *lane) stream() string {
	if l.group == "" {
		return schema.StreamInbox
	}
	return schema.StreamGroupLog
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
		s:      s,
		id:     rand.Text(),
		user:   user,
		device: device,
		sink:   sink,
		done:   make(chan struct{}),
		inbox: lane{
			subject: schema.UserInbox(user),
			live:    schema.Deliver(user),
		},
		// The first purge waits purgeEvery too, and up to half as long
		// again at random, so sessions that connected together (a
		// reconnect storm) do not purge together.
		lastPurge: time.Now().Add(mrand.N(s.purgeEvery/2 + 1)),
	}
}

// ID returns the session id (published in kicks, stored in presence).
func (ss *Session) ID() string { return ss.id }

// init loads the device cursor; catch-up starts after it. The group lanes
// are made by the worker's first step, which loads the memberships.
func (ss *Session) init(c deviceCursor) {
	ss.inbox.load(c.Floor, c.Acked)
	if len(c.Groups) > 0 {
		ss.aux().cur = c.Groups
	}
	ss.stale = ss.s.cfg.Groups != nil
	ss.lastFlush = monoNow()
}

// load sets the lane's position from a stored cursor.
func (l *lane) load(floor uint64, acked []uint64) {
	l.floor, l.next = floor, floor
	for _, q := range acked {
		if q > floor {
			if l.acked == nil {
				l.acked = make(map[uint64]struct{}, len(acked))
			}
			l.acked[q] = struct{}{}
		}
	}
	l.behind = true
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

// push hands a live message to the session (called by the dispatcher; it
// never blocks). dec is m decoded, or nil. If inline is set, a session with
// no worker and nothing else pending (a connected, idle device: the common
// case) handles it on the dispatcher's goroutine (runInline); otherwise it
// is queued for the worker. A group message reaches every member's session
// here: starting a worker goroutine for each (and a writer for each of
// those) queued them all in the scheduler, 120 ms for the last of 1,000
// members on 2 cores.
func (ss *Session) push(m *nats.Msg, dec *schema.Message, seqs liveSeq, now time.Time, inline bool) {
	ss.mu.Lock()
	switch {
	case ss.closing:
	case inline && !ss.working && !ss.woken && ss.ready && !ss.finished && len(ss.inq) == 0 && !ss.overflow:
		ss.working = true // the worker role: the worker state is ours
		ss.mu.Unlock()
		ss.runInline(liveMsg{m, dec, 0, seqs}, now) // handled as it arrives: no wait
		return
	case len(ss.inq) >= ss.s.queueMsgs || int(ss.inqBytes)+len(m.Data) > ss.s.queueBytes:
		ss.overflow = true
	default:
		ss.inq = append(ss.inq, liveMsg{m, dec, monoOf(now), seqs})
		ss.inqBytes += int32(len(m.Data))
	}
	ss.mu.Unlock()
	ss.signal()
}

// runInline handles one live message while holding the worker role, on
// the caller's goroutine. It does only what cannot wait on anything: the
// delivery (or noting a gap) and the timer. What needs a stream read, a
// membership load or the session's end is left to a worker, started here
// if so (Ack and the like only mark work pending while the role is held).
func (ss *Session) runInline(lm liveMsg, now time.Time) {
	ok := ss.live(lm, now)
	if ok {
		ss.arm(now)
	}
	ss.mu.Lock()
	ss.working = false
	if ok && (ss.stale || ss.behindAny()) {
		ss.woken = true
	}
	ss.startLocked() // a failed delivery terminated the session: woken is set
	ss.mu.Unlock()
}

// behindAny reports whether a lane has messages to read from its stream.
func (ss *Session) behindAny() bool {
	for l := range ss.lanes() {
		if l.behind {
			return true
		}
	}
	return false
}

// markGap makes the session re-read the streams after its positions.
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
		ss.closing, ss.closeCode, ss.closeReason = true, int16(code), reason
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
		now, ok := ss.step()
		if !ok {
			ss.finish()
			return
		}
		ss.arm(now)
	}
}

// step handles everything pending; false ends the session. It returns the
// time it started (one clock read per step: the clock is not free).
func (ss *Session) step() (time.Time, bool) {
	now := time.Now()
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
		return now, false
	}
	if over {
		ss.inbox.behind = true
		for _, l := range ss.groups {
			l.behind = !l.ended
		}
		ss.setLagging(true)
	}
	for _, lm := range q {
		if !ss.live(lm, now) {
			return now, false
		}
	}
	if ss.stale && !now.Before(ss.refreshTime()) {
		ss.refreshGroups()
	}
	if ss.inFlight == 0 {
		ss.dueAt = 0
	} else if !now.Before(ss.dueAt.time()) {
		if !ss.redeliver(now) {
			return now, false
		}
	}
	if ss.refill() {
		for l := range ss.lanes() {
			if l.behind && !now.Before(l.retryAt) && ss.inFlight < ss.s.cfg.MaxInFlight {
				before := ss.inFlight
				if !ss.fill(l, now) {
					return now, false
				}
				ss.fromStream = ss.fromStream || ss.inFlight > before
			}
		}
	}
	if ss.fromStream {
		ss.fromStream = false
		if f, ok := ss.sink.(Flusher); ok {
			f.Flush()
		}
	}
	ss.pruneGroups()
	if ss.flushWaiting() && !now.Before(ss.lastFlush.add(ss.s.cfg.CursorFlush)) {
		ss.flushAsync()
	}
	if ss.purgeWaiting() && !now.Before(ss.lastPurge.Add(ss.s.purgeEvery)) {
		ss.purgeAsync()
	}
	if ss.lagging && !ss.behindAny() {
		ss.setLagging(false)
	}
	return now, true
}

// setLagging records whether the session is catching up after losing
// live messages, in Service.lagging. Only the worker calls it.
func (ss *Session) setLagging(on bool) {
	if ss.lagging == on {
		return
	}
	ss.lagging = on
	if on {
		ss.s.lagging.Add(1)
		ss.s.metrics.lagging.Inc()
		ss.s.metrics.fellBehind.Inc()
	} else {
		ss.s.lagging.Add(-1)
		ss.s.metrics.lagging.Dec()
	}
}

// lanes yields the inbox lane, then the group lanes (without allocating).
func (ss *Session) lanes() iter.Seq[*lane] {
	return func(yield func(*lane) bool) {
		if !yield(&ss.inbox) {
			return
		}
		for _, l := range ss.groups {
			if !yield(l) {
				return
			}
		}
	}
}

// keepIdle is the capacity of a buffer an idle session keeps (see
// trimLocked): the worker of a member of a busy group exits between
// messages, and allocating its window and queues again for every message
// cost more than the few hundred bytes they hold.
const keepIdle = 4

// trimLocked drops the buffers an idle session does not need (they keep
// the capacity of the last burst otherwise). Called by the exiting worker.
func (ss *Session) trimLocked() {
	if len(ss.inq) == 0 && cap(ss.inq) > keepIdle {
		ss.inq = nil
	}
	if len(ss.acks) == 0 && cap(ss.acks) > keepIdle {
		ss.acks = nil
	}
	if cap(ss.spareQ) > keepIdle {
		ss.spareQ = nil
	}
	if cap(ss.spareAcks) > keepIdle {
		ss.spareAcks = nil
	}
	for l := range ss.lanes() {
		if len(l.flight) == 0 && cap(l.flight) > keepIdle {
			l.flight = nil
		}
		if len(l.acked) == 0 {
			l.acked = nil
		}
	}
}

// refill reports whether the window has room enough for a stream read: it
// is empty or at least half free, so a client acking one message at a time
// does not cause one read per message.
func (ss *Session) refill() bool {
	room := ss.s.cfg.MaxInFlight - ss.inFlight
	return ss.inFlight == 0 || (room > 0 && 2*room >= ss.s.cfg.MaxInFlight)
}

// flushWaiting reports whether the cursor waits for a write (step writes it
// CursorFlush after the last) and none runs.
func (ss *Session) flushWaiting() bool { return ss.dirty && !ss.flushing }

// purgeWaiting reports whether a purge waits (step runs it purgeEvery after
// the last) and no cursor write is pending or running.
func (ss *Session) purgeWaiting() bool { return ss.purgeDue && !ss.dirty && !ss.flushing }

// arm sets the timer for the next redelivery, flush or read retry; with
// nothing pending the timer stays off.
func (ss *Session) arm(now time.Time) {
	var due time.Time
	earlier := func(t time.Time) {
		if due.IsZero() || t.Before(due) {
			due = t
		}
	}
	if ss.inFlight > 0 {
		if ss.dueAt == 0 {
			ss.dueAt = monoNow() // unknown: check now
		}
		earlier(ss.dueAt.time())
	}
	// Only what step would do when the timer fires counts: a deadline
	// already past for work step skips (a flush while the last one still
	// runs, a read retry while the window is full) would fire the timer
	// again at once, step after step, until that changed. What ends those
	// waits wakes the worker itself (the background write's result, an
	// ack).
	if ss.flushWaiting() {
		earlier(ss.lastFlush.add(ss.s.cfg.CursorFlush))
	}
	if ss.refill() && ss.inFlight < ss.s.cfg.MaxInFlight { // as step's reads
		for l := range ss.lanes() {
			if l.behind && !l.retryAt.IsZero() {
				earlier(l.retryAt)
			}
		}
	}
	if ss.stale {
		earlier(ss.refreshTime()) // zero (now) unless a load failed
	}
	if ss.purgeWaiting() {
		earlier(ss.lastPurge.Add(ss.s.purgeEvery))
	}
	// Re-arming costs a lock of the runtime's timer heap: skip it when
	// the timer is set for the same, still future, deadline (most steps: a
	// delivery or an ack).
	at := monoOf(due)
	switch {
	case due.IsZero():
		if ss.timer != nil && ss.armedAt != 0 {
			ss.timer.Stop()
		}
		ss.armedAt = 0
	case at == ss.armedAt && now.Before(due):
	case ss.timer == nil:
		ss.timer = time.AfterFunc(time.Until(due), ss.signal)
		ss.armedAt = at
	default:
		ss.timer.Reset(time.Until(due))
		ss.armedAt = at
	}
}

// laneOf returns the lane whose live messages arrive on subject, or nil.
func (ss *Session) laneOf(subject string) *lane {
	if subject == ss.inbox.live {
		return &ss.inbox
	}
	for _, l := range ss.groups {
		if l.live == subject {
			return l
		}
	}
	return nil
}

// live handles one message from a live subject.
func (ss *Session) live(lm liveMsg, now time.Time) bool {
	m := lm.m
	if !lm.has {
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
	l := ss.laneOf(m.Subject)
	if l == nil {
		return true // a group the session has just left
	}
	if lm.bad {
		ss.s.log.Warn("bad live sequence header", "user", ss.user, "value", m.Header.Get(schema.HeaderSequence))
		return true
	}
	seq, last := lm.seq, lm.last
	switch {
	case l.ended || seq <= l.next: // over, or already sent (or skipped)
		return true
	case l.behind: // the stream read will reach it
		return true
	case last > l.next: // a gap: read the missing range first
		l.behind = true
		return true
	case ss.inFlight >= ss.s.cfg.MaxInFlight: // window full: read it later
		l.behind = true
		return true
	}
	if lm.dec != nil && lm.at != 0 {
		ss.s.noteWait(now.Sub(lm.at.time()), now) // a group message, decoded once for all
	}
	return ss.send(l, seq, m.Header, m.Data, lm.dec, now)
}

// send hands the stored message seq of lane l to the sink and tracks it. A
// group message the user may not see (sent outside its membership, or by
// the user) is skipped. dec is data decoded, or nil.
func (ss *Session) send(l *lane, seq uint64, hdr nats.Header, data []byte, dec *schema.Message, now time.Time) bool {
	if l.group != "" && (!l.member.Visible(seq) || hdr.Get(schema.HeaderSender) == schema.Token(ss.user)) {
		l.next = seq
		ss.advance(l)
		return true
	}
	if _, ok := l.acked[seq]; ok {
		l.next = seq
		return true
	}
	msg := dec
	if msg == nil {
		var err error
		if msg, err = schema.UnmarshalProto(data); err != nil {
			// Poison: it will never decode. Count it as acked so it does
			// not hold the floor (and the inbox) forever.
			ss.s.log.Error("undecodable message skipped", "user", ss.user, "subject", l.subject, "seq", seq, "err", err)
			l.next = seq
			ss.markAcked(l, seq)
			ss.advance(l)
			return true
		}
	}
	if l.group == "" && isMembershipEvent(msg) {
		// The user's groups changed: reload them (the event is stored
		// after the change, so the load sees it).
		ss.stale = true
		if ss.gs != nil {
			ss.gs.refreshAt, ss.gs.refreshBo = time.Time{}, 0
		}
	}
	if !ss.sink.Deliver(msg) {
		ss.slowConsumer()
		return false
	}
	ss.s.metrics.delivered.Inc()
	l.next = seq
	l.flight = append(l.flight, inflight{seq: seq, id: msg.ID, sent: now})
	if ss.inFlight == 0 {
		ss.dueAt = monoOf(now.Add(ss.s.cfg.AckTimeout))
	}
	ss.inFlight++
	return true
}

// isMembershipEvent reports whether m is a group event that may change the
// recipient's memberships (see package groups: NOTIFICATION messages with
// Meta action add, remove or delete).
func isMembershipEvent(m *schema.Message) bool {
	if m.Type != schema.TypeNotification || !schema.GroupID(m.Destination).Valid() {
		return false
	}
	switch m.Meta[schema.MetaAction] {
	case "add", "remove", "delete":
		return true
	}
	return false
}

func (ss *Session) slowConsumer() {
	ss.s.log.Info("slow consumer", "user", ss.user, "device", ss.device, "conn_id", ss.id)
	ss.terminate(CloseSlowConsumer, "slow consumer")
}

// fill reads lane l's stream after next into the window until the window
// is full or the stream has no more.
func (ss *Session) fill(l *lane, now time.Time) bool {
	if l.group != "" && l.member.Current() {
		switch done, ok := ss.fillRecent(l, now); {
		case !ok:
			return false
		case done:
			return true
		}
	}
	dead, full, over := false, false, false
	room := ss.s.cfg.MaxInFlight - ss.inFlight
	end, err := ss.s.scan(ss.ctx, l.stream(), l.subject, l.next+1, min(room, 256), func(m *jetstream.RawStreamMsg) bool {
		if m.Sequence <= l.next {
			return true
		}
		if l.group != "" && !l.member.Current() && m.Sequence >= l.member.End() {
			over = true // nothing after the membership's end is for the user
			return false
		}
		if ss.inFlight >= ss.s.cfg.MaxInFlight {
			full = true
			return false
		}
		if !ss.send(l, m.Sequence, m.Header, m.Data, nil, now) {
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
			l.backoff = min(max(2*l.backoff, 100*time.Millisecond), 5*time.Second)
			l.retryAt = time.Now().Add(l.backoff)
			ss.s.warn("stream read", "user", ss.user, "device", ss.device, "subject", l.subject, "err", err)
		}
		return true
	}
	l.backoff, l.retryAt = 0, time.Time{}
	if (end || over) && !full {
		l.behind = false
		if l.group != "" && !l.member.Current() {
			l.ended = true
		}
	}
	ss.advance(l) // skipped (already acked) messages may move the floor
	return true
}

// fillRecent reads group lane l's next messages from the group's latest
// live messages on this node (see recent) instead of the stream, as far as
// they go without a hole. done: nothing is left for the stream read (the
// newest was reached, or the window is full); false ok: the session ended.
func (ss *Session) fillRecent(l *lane, now time.Time) (done, ok bool) {
	r := ss.s.recentOf(l.group)
	if r == nil {
		return false, true
	}
	room := ss.s.cfg.MaxInFlight - ss.inFlight
	if room <= 0 {
		return true, true
	}
	batch, newest := r.after(l.next, room, ss.s.recentPool.get())
	defer ss.s.recentPool.put(batch)
	for i := range batch {
		e := &batch[i]
		if !ss.send(l, e.seq, e.m.Header, e.m.Data, e.dec, now) {
			return true, false
		}
	}
	if len(batch) > 0 {
		ss.s.metrics.fromRecent.Add(float64(len(batch)))
		ss.fromStream = true // a batch: flush it (see Flusher)
		ss.advance(l)
	}
	switch {
	case newest:
		l.behind, l.backoff, l.retryAt = false, 0, time.Time{}
		return true, true
	case ss.inFlight >= ss.s.cfg.MaxInFlight:
		return true, true
	}
	return false, true
}

// redeliver sends again every in-flight message sent at least AckTimeout
// ago, in order per lane, reading it from the stream.
//
// dueAt is a lower bound of the next redelivery: set when the first message
// goes in flight (later ones are due later) and recomputed here, so the
// window is scanned once per AckTimeout rather than on every step.
func (ss *Session) redeliver(now time.Time) bool {
	var oldest time.Time
	for l := range ss.lanes() {
		if !ss.redeliverLane(l, now) {
			return false
		}
		for i := range l.flight {
			if oldest.IsZero() || l.flight[i].sent.Before(oldest) {
				oldest = l.flight[i].sent
			}
		}
	}
	ss.dueAt = 0
	if !oldest.IsZero() {
		ss.dueAt = monoOf(oldest.Add(ss.s.cfg.AckTimeout))
	}
	return true
}

func (ss *Session) redeliverLane(l *lane, now time.Time) bool {
	cut := now.Add(-ss.s.cfg.AckTimeout)
	var due []uint64
	for i := range l.flight {
		if !l.flight[i].sent.After(cut) {
			due = append(due, l.flight[i].seq)
			l.flight[i].sent = now // at most once per AckTimeout, even if the read fails
		}
	}
	if len(due) == 0 {
		return true
	}
	last := due[len(due)-1]
	seen := make(map[uint64]bool, len(due))
	dead := false
	_, err := ss.s.scan(ss.ctx, l.stream(), l.subject, due[0], min(len(l.flight)+len(l.acked), 256), func(m *jetstream.RawStreamMsg) bool {
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
		ss.fromStream = true
		ss.s.metrics.redelivered.Inc()
		return true
	})
	if dead {
		ss.slowConsumer()
		return false
	}
	if err != nil {
		if ss.ctx.Err() == nil {
			ss.s.warn("stream read for redelivery", "user", ss.user, "device", ss.device, "subject", l.subject, "err", err)
		}
		return true
	}
	// Due messages no longer in the stream expired (MaxAge, or a group's
	// per-subject cap): nothing left to deliver, so they count as acked.
	gone := false
	for _, q := range due {
		if !seen[q] {
			ss.markAcked(l, q)
			gone = true
		}
	}
	if gone {
		ss.advance(l)
	}
	return true
}

// applyAcks acks every in-flight message whose id is in ids, in any lane.
func (ss *Session) applyAcks(ids []string) {
	n := 0
	for l := range ss.lanes() {
		k := 0
		for _, id := range ids {
			for i := 0; i < len(l.flight); {
				if l.flight[i].id == id {
					ss.markAcked(l, l.flight[i].seq)
					k++
					continue // markAcked removed flight[i]
				}
				i++
			}
		}
		if k > 0 {
			if l == &ss.inbox {
				ss.unpurged += k // acked mail still counts against the inbox cap
			}
			n += k
			ss.advance(l)
		}
	}
	if n > 0 {
		ss.s.metrics.acks.Add(float64(n))
	}
}

// markAcked records seq of lane l as acked and drops it from the window.
func (ss *Session) markAcked(l *lane, seq uint64) {
	if i, ok := slices.BinarySearchFunc(l.flight, seq, func(f inflight, q uint64) int {
		return cmp.Compare(f.seq, q)
	}); ok {
		l.flight = slices.Delete(l.flight, i, i+1)
		ss.inFlight--
	}
	// Every caller advances the floor next: an ack it will pass (the oldest
	// in flight, acks in order: the common case) need not be recorded, and
	// a lane acked in order then allocates no map.
	if seq > l.floor && seq > l.ackFloor() {
		if l.acked == nil {
			l.acked = make(map[uint64]struct{})
		}
		l.acked[seq] = struct{}{}
	}
	ss.dirty = true
}

// advance moves lane l's floor over everything acked: up to just below the
// oldest in-flight message, or to next when nothing is in flight.
func (ss *Session) advance(l *lane) {
	f := l.ackFloor()
	if f <= l.floor {
		return
	}
	l.setFloor(f)
	ss.dirty = true
}

// ackFloor is the floor advance moves lane l to: just below the oldest
// in-flight message, or next when nothing is in flight.
func (l *lane) ackFloor() uint64 {
	if len(l.flight) > 0 {
		return l.flight[0].seq - 1
	}
	return l.next
}

func (l *lane) setFloor(f uint64) {
	l.floor = f
	for q := range l.acked {
		if q <= f {
			delete(l.acked, q)
		}
	}
}

// position returns the lane's position as a laneCursor.
func (l *lane) position() laneCursor {
	c := laneCursor{Floor: l.floor}
	if len(l.acked) > 0 {
		c.Acked = make([]uint64, 0, len(l.acked))
		for q := range l.acked {
			c.Acked = append(c.Acked, q)
		}
		slices.Sort(c.Acked)
	}
	return c
}

// cursor returns the session's position as a deviceCursor.
func (ss *Session) cursor() *deviceCursor {
	c := &deviceCursor{laneCursor: ss.inbox.position(), Seen: time.Now().UnixMilli()}
	for _, l := range ss.groups {
		if c.Groups == nil {
			c.Groups = make(map[string]*laneCursor, len(ss.groups))
		}
		p := l.position()
		c.Groups[string(l.group)] = &p
	}
	if ss.gs != nil {
		// Groups without a lane: pruned ones (their last acks may not be
		// written yet) and stored ones not (yet) made lanes.
		for g, p := range ss.gs.cur {
			if c.Groups == nil {
				c.Groups = make(map[string]*laneCursor, len(ss.gs.cur))
			}
			c.Groups[g] = p
		}
	}
	return c
}

// refreshGroups loads the user's memberships and makes the group lanes
// match them: a lane per group the user is in, or was in with messages
// still to read (subscribed live only while a member). Groups that are gone
// (deleted, or left longer ago than the retention) lose their cursors. A
// failed load is retried with backoff.
func (ss *Session) refreshGroups() {
	ctx, cancel := context.WithTimeout(ss.ctx, ss.s.opTimeout)
	ms, err := ss.s.cfg.Groups.Memberships(ctx, ss.user)
	cancel()
	if err != nil {
		if ss.ctx.Err() == nil {
			g := ss.aux()
			g.refreshBo = min(max(2*g.refreshBo, 500*time.Millisecond), 30*time.Second)
			g.refreshAt = time.Now().Add(g.refreshBo)
			ss.s.warn("load memberships", "user", ss.user, "err", err)
		}
		return
	}
	ss.stale = false
	if ss.gs != nil {
		ss.gs.refreshAt, ss.gs.refreshBo = time.Time{}, 0
	}
	want := make(map[schema.GroupID]schema.Membership, len(ms))
	for _, m := range ms {
		if m.Group.Valid() && len(m.Epochs) > 0 {
			want[m.Group] = m
		}
	}
	kept := ss.groups[:0]
	for _, l := range ss.groups {
		m, ok := want[l.group]
		delete(want, l.group)
		if !ok {
			ss.dropLane(l)
			ss.forget(l.group)
			continue
		}
		if !slices.Equal(l.member.Epochs, m.Epochs) {
			l.member, l.ended, l.behind = &m, false, true
		}
		ss.subscribe(l)
		kept = append(kept, l)
	}
	clear(ss.groups[len(kept):])
	ss.groups = kept
	if ss.gs != nil {
		for g := range ss.gs.cur {
			if _, ok := want[schema.GroupID(g)]; !ok {
				ss.forget(schema.GroupID(g))
			}
		}
	}
	for g, m := range want {
		floor := m.Start()
		var acked []uint64
		if ss.gs != nil {
			if c := ss.gs.cur[string(g)]; c != nil {
				floor, acked = max(floor, c.Floor), c.Acked
			}
		}
		if !m.Current() && floor+1 >= m.End() {
			continue // read to its end already: keep the cursor, no lane
		}
		if ss.gs != nil {
			delete(ss.gs.cur, string(g))
		}
		l := &lane{
			subject: schema.GroupLog(g),
			live:    schema.DeliverGroup(g),
			group:   g,
			member:  &m,
		}
		l.load(floor, acked)
		ss.subscribe(l)
		ss.groups = append(ss.groups, l)
	}
}

// forget drops the stored cursor of group g with the next cursor write.
func (ss *Session) forget(g schema.GroupID) {
	a := ss.aux()
	delete(a.cur, string(g))
	a.dropped = append(a.dropped, g)
	ss.dirty = true
}

// refreshTime is when the memberships may be loaded again: zero (now)
// unless a load failed.
func (ss *Session) refreshTime() time.Time {
	if ss.gs == nil {
		return time.Time{}
	}
	return ss.gs.refreshAt
}

// takeDropped returns the groups whose cursors the next write forgets.
func (ss *Session) takeDropped() []schema.GroupID {
	if ss.gs == nil {
		return nil
	}
	d := ss.gs.dropped
	ss.gs.dropped = nil
	return d
}

// subscribe makes lane l's live subscription match its membership: on
// while the user is a member, off after.
func (ss *Session) subscribe(l *lane) {
	switch cur := l.member.Current(); {
	case cur && !l.joined:
		if err := ss.s.joinGroup(ss, l.group); err != nil {
			ss.s.log.Warn("subscribe group", "user", ss.user, "group", l.group, "err", err)
			l.behind = true // read it from the stream; retried on the next membership load
			return
		}
		l.joined = true
	case !cur && l.joined:
		ss.s.leaveGroup(ss, l.group)
		l.joined = false
	}
}

// dropLane stops tracking group lane l: no live subscription, no
// in-flight messages.
func (ss *Session) dropLane(l *lane) {
	if l.joined {
		ss.s.leaveGroup(ss, l.group)
		l.joined = false
	}
	ss.inFlight -= len(l.flight)
	l.flight = nil
}

// pruneGroups drops the lanes of groups the user left once everything sent
// while a member was read and acked. Their cursors stay (a later load of the
// memberships still lists the group until its end is past the retention)
// so that nothing is delivered twice.
func (ss *Session) pruneGroups() {
	kept := ss.groups[:0]
	for _, l := range ss.groups {
		if l.ended && len(l.flight) == 0 {
			ss.dropLane(l)
			a := ss.aux()
			if a.cur == nil {
				a.cur = make(map[string]*laneCursor)
			}
			p := l.position()
			a.cur[string(l.group)] = &p
			continue
		}
		kept = append(kept, l)
	}
	clear(ss.groups[len(kept):])
	ss.groups = kept
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
// purged too. Purges concern the inbox only: GROUP_LOG is shared by every
// member and bounded by its limits.
//
// While the session runs, the write (a KV read and a compare-and-swap
// write) goes on in a goroutine of its own, one at a time, so delivery
// never waits for it: with 1,000 sessions flushing once a second, waiting
// cost group messages hundreds of milliseconds. The worker applies the
// outcome on its next step (applyFlush). The final write at the session's
// end is synchronous (flush).

// flushAsync starts a background write of the cursor as it is now.
func (ss *Session) flushAsync() {
	ss.lastFlush = monoNow()
	if ss.forgotten {
		ss.dirty = false
		return
	}
	mine, dropped := ss.cursor(), ss.takeDropped()
	ss.dirty = false
	// Acked mail still counts against the inbox cap until it is purged:
	// a device that reads a lot purges sooner than purgeEvery.
	urgent := ss.unpurged >= ss.s.purgeAcks
	purge := urgent || time.Since(ss.lastPurge) >= ss.s.purgeEvery
	if purge {
		ss.lastPurge, ss.purgeDue, ss.unpurged = time.Now(), false, 0
	}
	ss.background(func(ctx context.Context) flushResult {
		return ss.writeCursor(ctx, mine, dropped, purge, urgent)
	})
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
			ss.s.warn("inbox purge", "user", ss.user, "err", err)
			return flushResult{}
		}
		ran, err := ss.s.tryPurge(ctx, a, ss.user, doc, false)
		if err != nil {
			ss.s.warn("inbox purge", "user", ss.user, "err", err)
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

// writeCursor merges mine into the stored cursor of the device, drops the
// cursors of the groups in dropped and, if purge, purges what every device
// has acked. It touches no worker state. A failed write is retried with a
// later cursor, so dropped groups are remembered by the caller only until
// this write: one that fails keeps their cursors until the session's next
// membership change, which is harmless (a stale group cursor is ignored).
func (ss *Session) writeCursor(ctx context.Context, mine *deviceCursor, dropped []schema.GroupID, purge, urgent bool) flushResult {
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
		for _, g := range dropped {
			delete(c.Groups, string(g))
		}
		res.merged = c.clone()
		return true
	})
	if err != nil {
		ss.s.warn("cursor flush", "user", ss.user, "device", ss.device, "err", err)
		res.err = err
		return res
	}
	if res.merged != nil && purge {
		ran, err := ss.s.tryPurge(ctx, a, ss.user, doc, urgent)
		if err != nil {
			ss.s.warn("inbox purge", "user", ss.user, "err", err)
		}
		res.purged = ran // skipped when the node is busy purging: purgeDue
	}
	return res
}

// flush writes the cursor now, purging too: the session's final write.
func (ss *Session) flush(ctx context.Context) {
	ss.lastFlush = monoNow()
	if ss.forgotten {
		ss.dirty = false
		return
	}
	ss.lastPurge, ss.purgeDue = time.Now(), false
	ctx, cancel := context.WithTimeout(ctx, ss.s.opTimeout)
	defer cancel()
	res := ss.writeCursor(ctx, ss.cursor(), ss.takeDropped(), true, ss.unpurged >= ss.s.purgeAcks)
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
		ss.s.warn("inbox purge", "user", ss.user, "err", err)
		return
	}
	// A busy node skips it: the user's next session purges.
	if _, err := ss.s.tryPurge(ctx, a, ss.user, doc, false); err != nil {
		ss.s.warn("inbox purge", "user", ss.user, "err", err)
	}
}

// adopt applies acks recorded by others to the session.
func (ss *Session) adopt(c *deviceCursor) {
	ss.adoptLane(&ss.inbox, &c.laneCursor)
	for _, l := range ss.groups {
		if gc := c.Groups[string(l.group)]; gc != nil {
			ss.adoptLane(l, gc)
		}
	}
}

func (ss *Session) adoptLane(l *lane, c *laneCursor) {
	for i := 0; i < len(l.flight); {
		q := l.flight[i].seq
		if _, ok := slices.BinarySearch(c.Acked, q); ok || q <= c.Floor {
			l.flight = slices.Delete(l.flight, i, i+1)
			ss.inFlight--
			continue
		}
		i++
	}
	for _, q := range c.Acked {
		if q > l.floor {
			if l.acked == nil {
				l.acked = make(map[uint64]struct{})
			}
			l.acked[q] = struct{}{}
		}
	}
	if c.Floor > l.next {
		l.next = c.Floor
	}
	if c.Floor > l.floor {
		l.setFloor(c.Floor)
	}
	ss.advance(l)
}

// finish runs in the last worker when the session ends: close the sink if asked,
// flush the cursor, deregister.
func (ss *Session) finish() {
	ss.mu.Lock()
	ss.closing, ss.finished = true, true
	code, reason := int(ss.closeCode), ss.closeReason
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
	for _, l := range ss.groups {
		if l.joined {
			ss.s.leaveGroup(ss, l.group)
			l.joined = false
		}
	}
	ss.setLagging(false)
	ss.s.metrics.sessions.Dec()
	ss.s.unregister(ss)
	close(ss.done)
	ss.s.wg.Done()
}
