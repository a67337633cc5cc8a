package gateway

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/time/rate"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// maxCloseReason is the longest close reason a close frame can carry.
const maxCloseReason = 123

// frame is one queued server-to-client WebSocket message.
type frame struct {
	typ  int // websocket.TextMessage or websocket.BinaryMessage
	data []byte
}

// conn is one WebSocket connection. One goroutine owned by the Gateway runs
// its read loop (the HTTP handler returns right after the upgrade, so the
// server's per-connection state is freed). A write goroutine exists only
// while there is something to write: Deliver, the read loop's replies, the
// ping timer and Close start it, it exits when the queue is empty, and the
// read goroutine joins it. At most one runs at a time and it owns every data
// write. An idle connection holds no queue, no write buffer (the upgrader's
// pool) and one goroutine. Deliver and Close (the Sink) may be called from
// any goroutine.
type conn struct {
	g       *Gateway
	ws      *websocket.Conn // set once, before the read loop starts
	nc      *corkConn       // ws's network connection
	id      string
	user    schema.UserID
	device  schema.DeviceID
	binary  bool          // server frames are protobuf (format=binary), else JSON text
	ack     bool          // SERVER_ACK for every accepted message (ack=true)
	limiter *rate.Limiter // made by the read loop on the first message
	// inflight holds a token per message waiting for its commit; made by
	// the read loop on the first message.
	inflight chan struct{}
	sess     Session
	ping     *time.Timer   // marks a ping due every PingInterval
	done     chan struct{} // closed when the read loop has ended
	writers  sync.WaitGroup
	// The deadlines set last: wdeadline is touched only by the one
	// running writer (see writing), rdeadline only by the read loop.
	wdeadline, rdeadline time.Time
	// rbuf is the read loop's frame buffer, reused from frame to frame
	// (see readFrame).
	rbuf []byte
	// lastWrite is when the last batch of frames was written, frameGap
	// the recent time between frames; only the running writer touches them
	// (see coalesceWait).
	lastWrite time.Time
	frameGap  time.Duration

	mu          sync.Mutex
	room        sync.Cond // on mu: signalled when the queue shrinks or the connection is closing
	q           []frame   // outbound queue; nil while idle
	pending     int       // frames queued or being written, at most OutboundQueue
	started     bool      // the read loop runs: writers may start
	writing     bool      // a write goroutine is running
	pingDue     bool
	closeReq    bool // Close was called: the writer sends the close frame
	closeCode   int
	closeReason string
	broken      bool // a write failed; the socket is closed
	readDone    bool // the read loop has ended: start no writer
	urgent      bool // Flush: write what is queued without coalescing
	// wake interrupts a writer holding frames (coalesceWait); made by the
	// first writer that waits.
	wake chan struct{}
}

// Deliver implements Sink: render m for this connection and enqueue it
// without blocking. False means the queue is full or the socket is closing.
func (c *conn) Deliver(m *schema.Message) bool {
	if c.closing() {
		return false
	}
	f := c.render(m)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closingLocked() || c.pending >= c.g.cfg.OutboundQueue {
		return false
	}
	c.enqueueLocked(f)
	return true
}

// Flush implements delivery.Flusher: what is queued goes out without
// waiting for more (frames read from a stream, a catch-up). Non-blocking.
func (c *conn) Flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hurryLocked()
}

// hurryLocked makes the writer send what is queued without holding it.
func (c *conn) hurryLocked() {
	c.urgent = true
	c.wakeLocked()
}

// wakeLocked interrupts a writer holding frames back (see coalesceWait).
func (c *conn) wakeLocked() {
	if c.wake != nil {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
}

// Close implements Sink: ask the writer to close the socket with code and
// reason. Non-blocking; only the first call counts.
func (c *conn) Close(code int, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeReq {
		return
	}
	if len(reason) > maxCloseReason {
		reason = reason[:maxCloseReason]
	}
	c.closeReq, c.closeCode, c.closeReason = true, code, reason
	c.room.Broadcast()
	c.wakeLocked()
	c.startWriterLocked()
}

func (c *conn) closing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closingLocked()
}

func (c *conn) closingLocked() bool { return c.closeReq || c.readDone || c.broken }

// render encodes m for this connection. The last message encoded in each
// format is kept: a group message reaches every member's socket as the
// same *schema.Message (delivery.Sink: not modified once delivered), so a
// 1,000-member fan-out encodes it once per format instead of 1,000 times.
// Frames are never modified once rendered, so sockets share the bytes.
func (c *conn) render(m *schema.Message) frame {
	last, enc, typ := &c.g.lastJSON, schema.RenderJSON, websocket.TextMessage
	if c.binary {
		last, enc, typ = &c.g.lastProto, (*schema.Message).MarshalProto, websocket.BinaryMessage
	}
	if r := last.Load(); r != nil && r.m == m {
		return frame{typ, r.data}
	}
	data := enc(m)
	last.Store(&rendered{m, data})
	return frame{typ, data}
}

// rendered is a message and its encoding in one format.
type rendered struct {
	m    *schema.Message
	data []byte
}

// send enqueues a frame produced by the read loop (pong, SERVER_ACK, error
// notice). It waits for room: a client that does not read its acks stops
// being read (backpressure) until the write timeout closes it.
func (c *conn) send(f frame) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.pending >= c.g.cfg.OutboundQueue && !c.closingLocked() {
		c.room.Wait()
	}
	if c.closingLocked() {
		return false
	}
	c.replyLocked(f)
	return true
}

// replyLocked queues an answer to the client's own frame (SERVER_ACK,
// error notice, pong): it goes out without waiting for more frames (see
// coalesceWait), and takes what is queued with it.
func (c *conn) replyLocked(f frame) {
	c.hurryLocked()
	c.enqueueLocked(f)
}

func (c *conn) enqueueLocked(f frame) {
	c.q = append(c.q, f)
	c.pending++
	if len(c.q) == coalesceFrames {
		c.wakeLocked() // enough to share a write: a holding writer stops waiting
	}
	c.startWriterLocked()
}

// startWriterLocked starts the write goroutine unless one runs, the read
// loop has not started (frames queued before the upgrade wait for it) or it
// has ended (it joins the writers and must not see new ones).
func (c *conn) startWriterLocked() {
	if !c.started || c.writing || c.readDone || c.broken {
		return
	}
	c.writing = true
	c.writers.Add(1)
	go c.writeLoop()
}

// pingTick runs on the ping timer: it marks a ping due and re-arms.
func (c *conn) pingTick() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.readDone || c.broken {
		return
	}
	c.pingDue = true
	c.startWriterLocked()
	c.ping.Reset(c.g.cfg.PingInterval)
}

// serveWS authenticates, opens the delivery session, upgrades and hands the
// connection to a goroutine owned by the Gateway.
func (g *Gateway) serveWS(w http.ResponseWriter, r *http.Request) {
	if !websocket.IsWebSocketUpgrade(r) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "websocket upgrade required")
		return
	}
	if !g.checkOrigin(r) {
		g.log.Info("origin rejected", "origin", r.Header.Get("Origin"), "remote", r.RemoteAddr)
		api.WriteError(w, http.StatusForbidden, api.CodeForbidden, "origin not allowed")
		return
	}
	id, ok := g.authenticate(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	c := &conn{
		g:      g,
		id:     "c" + strconv.FormatUint(g.connSeq.Add(1), 10),
		user:   id.User,
		device: id.Device,
		binary: q.Get("format") == "binary",
		ack:    q.Get("ack") == "true",
		done:   make(chan struct{}),
	}
	c.room.L = &c.mu
	if err := g.register(c); err != nil {
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "server shutting down")
		return
	}
	sess, err := g.cfg.Delivery.Open(g.ctx, c.user, c.device, c)
	if err != nil {
		g.unregister(c)
		c.logger().Error("open delivery session", "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "delivery unavailable")
		return
	}
	c.sess = sess
	cw := &corkingWriter{ResponseWriter: w, writes: g.metrics.writes}
	ws, err := g.upgrader.Upgrade(cw, r, nil)
	if err != nil {
		g.unregister(c)
		sess.Close()
		c.logger().Info("websocket upgrade failed", "err", err)
		return
	}
	c.ws, c.nc = ws, cw.conn
	remote, origin := r.RemoteAddr, r.Header.Get("Origin")
	g.metrics.conns.Inc()
	go func() {
		defer g.unregister(c)
		defer g.metrics.conns.Dec()
		c.run(g.ctx, remote, origin)
	}()
}

// logger returns the connection's logger. It is built on use, not kept: an
// idle connection logs nothing.
func (c *conn) logger() *slog.Logger {
	return c.g.log.With("conn_id", c.id, "user", string(c.user), "device", string(c.device))
}

func (c *conn) run(ctx context.Context, remote, origin string) {
	start := time.Now()
	readWait := c.g.cfg.PingInterval * 5 / 2
	c.ws.SetReadLimit(c.g.hardLimit)
	c.armReadDeadline(start, readWait)
	c.ws.SetPongHandler(func(string) error {
		c.armReadDeadline(time.Now(), readWait)
		return nil
	})
	c.ws.SetPingHandler(func(data string) error {
		c.armReadDeadline(time.Now(), readWait)
		err := c.ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(c.g.cfg.WriteTimeout))
		var ne net.Error
		if errors.Is(err, websocket.ErrCloseSent) || (errors.As(err, &ne) && ne.Timeout()) {
			return nil
		}
		return err
	})
	format := "text"
	if c.binary {
		format = "binary"
	}
	c.logger().Info("connected", "remote", remote, "origin", origin, "format", format, "ack", c.ack)

	c.mu.Lock()
	c.ping = time.AfterFunc(c.g.cfg.PingInterval, c.pingTick)
	c.started = true
	if c.closeReq || len(c.q) > 0 {
		c.startWriterLocked()
	}
	c.mu.Unlock()
	reason := c.readLoop(ctx, readWait)
	c.mu.Lock()
	c.readDone = true
	c.room.Broadcast()
	c.ping.Stop()
	c.mu.Unlock()
	close(c.done)
	c.writers.Wait()
	_ = c.ws.Close()
	c.sess.Close()
	c.logger().Info("disconnected", "reason", reason, "duration", time.Since(start).Round(time.Millisecond))
}

// writeLoop writes queued frames and due pings until there is nothing left
// to write; a close request wins over queued frames: it sends the close
// frame and gives the peer WriteTimeout to answer before dropping the TCP
// connection. Any write error drops the connection, which ends the read
// loop.
func (c *conn) writeLoop() {
	defer c.writers.Done()
	wt := c.g.cfg.WriteTimeout
	var batch []frame
	coalesce := c.g.cfg.WriteCoalesce > 0
	var since time.Time // when the frames now queued were found
	if coalesce {
		since = time.Now()
	}
	for {
		c.mu.Lock()
		switch {
		case c.closeReq:
			c.q, c.pending, c.writing = nil, 0, false
			c.mu.Unlock()
			c.writeClose()
			return
		case c.readDone || c.broken:
			c.q, c.pending, c.writing = nil, 0, false
			c.mu.Unlock()
			return
		case c.pingDue:
			c.pingDue = false
			c.mu.Unlock()
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(wt)); err != nil {
				c.logger().Info("ping failed", "err", err)
				c.fail()
			}
			continue
		case len(c.q) == 0:
			c.q, c.writing = nil, false // idle: hold no queue
			c.mu.Unlock()
			return
		}
		if wait := c.coalesceWait(since); wait > 0 {
			if c.wake == nil {
				c.wake = make(chan struct{}, 1)
			}
			wake := c.wake
			c.mu.Unlock()
			t := time.NewTimer(wait) // frames queued meanwhile join the batch
			select {
			case <-t.C:
			case <-wake: // Flush or Close
				t.Stop()
			}
			continue
		}
		if len(c.q) <= maxWriteBatch {
			batch, c.q = c.q, batch[:0]
		} else {
			batch = append(batch[:0], c.q[:maxWriteBatch]...)
			n := copy(c.q, c.q[maxWriteBatch:])
			clear(c.q[n:])
			c.q = c.q[:n]
		}
		c.urgent = c.urgent && len(c.q) > 0 // the rest of a Flush goes out at once too
		c.mu.Unlock()
		if testWriteBatch != nil {
			testWriteBatch(len(batch))
		}
		if err := c.writeFrames(batch, wt); err != nil {
			c.logger().Info("write failed", "err", err)
			c.fail()
			continue // broken: the loop ends
		}
		if coalesce {
			c.noteWrite(time.Now(), len(batch))
			since = c.lastWrite
		}
		c.g.metrics.frames.Add(float64(len(batch)))
		c.mu.Lock()
		c.pending -= len(batch)
		c.room.Broadcast()
		c.mu.Unlock()
		clear(batch)
	}
}

// maxWriteBatch is the most frames the writer takes from the queue for one
// write. Frames count against OutboundQueue until their batch is written,
// and a client acks the first frames of a batch while the rest are still
// being written; the Deliverer then sends more (its window is of unacked
// messages). A bounded batch bounds that overlap: OutboundQueue must hold
// the Deliverer's window plus one batch (the defaults: 256 + 128 < 512).
const maxWriteBatch = 128

// testWriteBatch, if set (tests only), is told each batch's size.
var testWriteBatch func(n int)

// coalesceFrames is the queue length at which the writer does not wait
// for more (see coalesceWait), and at which a waiting writer is woken:
// eight frames already share a write, and a fast stream must not fill the
// outbound queue (a slow consumer) while the writer waits.
const coalesceFrames = 8

// coalesceWait is how long the writer holds the frames it found at since
// before writing them. A busy socket, one whose frames have lately come
// less than Config.WriteCoalesce apart (see noteWrite) and was written
// less than that before since, holds them until WriteCoalesce after since,
// so that the next ones share the write (Nagle's rule, with a time instead
// of an ack). Frames to a socket with sparser traffic, to one that has
// been quiet, coalesceFrames of them, frames after a Flush, and replies
// to the client (replyLocked) go out at once. A close frame and a ping
// never wait (they are handled before). Called with mu held.
func (c *conn) coalesceWait(since time.Time) time.Duration {
	d := c.g.cfg.WriteCoalesce
	if d <= 0 || c.urgent || c.frameGap == 0 || c.frameGap >= d || since.Sub(c.lastWrite) >= d || len(c.q) >= coalesceFrames {
		return 0
	}
	return d - time.Since(since)
}

// noteWrite records a write of n frames at now: frameGap follows the time
// between frames (a moving average over about the last four writes; the
// first write leaves it 0, unknown). Only the running writer calls it.
func (c *conn) noteWrite(now time.Time, n int) {
	if !c.lastWrite.IsZero() {
		gap := now.Sub(c.lastWrite) / time.Duration(n)
		if c.frameGap == 0 {
			c.frameGap = gap
		} else {
			c.frameGap += (gap - c.frameGap) / 4
		}
	}
	c.lastWrite = now
}

// writeFrames writes the frames queued together with as few system writes
// as they fit in (see corkConn), under one write deadline.
func (c *conn) writeFrames(batch []frame, wt time.Duration) error {
	c.armWriteDeadline(wt)
	if len(batch) == 1 {
		return c.ws.WriteMessage(batch[0].typ, batch[0].data)
	}
	c.nc.cork()
	for _, f := range batch {
		if err := c.ws.WriteMessage(f.typ, f.data); err != nil {
			_ = c.nc.uncork()
			return err
		}
	}
	return c.nc.uncork()
}

// armWriteDeadline re-arms the write deadline when less than half of wt is
// left: a write stuck for between wt/2 and wt fails, and a busy socket does
// not reset a timer for every frame. Only the running writer calls it.
func (c *conn) armWriteDeadline(wt time.Duration) {
	if now := time.Now(); c.wdeadline.Sub(now) < wt/2 {
		c.wdeadline = now.Add(wt)
		_ = c.ws.SetWriteDeadline(c.wdeadline)
	}
}

// fail marks the connection broken after a write error and closes the
// socket, which ends the read loop.
func (c *conn) fail() {
	c.mu.Lock()
	c.broken = true
	c.room.Broadcast()
	c.mu.Unlock()
	_ = c.ws.Close()
}

func (c *conn) writeClose() {
	wt := c.g.cfg.WriteTimeout
	c.mu.Lock()
	msg := websocket.FormatCloseMessage(c.closeCode, c.closeReason)
	c.mu.Unlock()
	if err := c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(wt)); err != nil {
		_ = c.ws.Close()
		return
	}
	grace := time.NewTimer(wt)
	defer grace.Stop()
	select {
	case <-c.done: // the peer answered (or the read failed)
	case <-grace.C:
		_ = c.ws.Close()
	}
}

// readLoop reads frames until the connection ends and returns why it ended
// (for the disconnect log).
func (c *conn) readLoop(ctx context.Context, readWait time.Duration) string {
	maxFrame := c.g.cfg.MaxFrameBytes
	for {
		typ, rd, err := c.ws.NextReader()
		if err != nil {
			return c.readEnd(err)
		}
		c.armReadDeadline(time.Now(), readWait)
		data, err := c.readFrame(rd, maxFrame)
		if err != nil {
			return c.readEnd(err)
		}
		if c.closing() {
			continue // after our close frame, frames are discarded (RFC 6455 §5.5.1)
		}
		if len(data) > maxFrame {
			if _, err := io.Copy(io.Discard, rd); err != nil {
				return c.readEnd(err)
			}
			c.reject("", schema.CodeTooLarge, "frame exceeds "+strconv.Itoa(maxFrame)+" bytes")
			continue
		}
		c.handleFrame(ctx, typ, data)
	}
}

// Read buffers: a frame is read into the connection's buffer, which starts
// at readBufInitial bytes, grows as a frame needs, and is kept for the
// next frame unless it grew past readBufKept. The decoders copy what they
// keep of a frame (checkNoAlias in schema's fuzz tests), so the buffer is free
// again as soon as handleFrame returns; a socket streaming acks then costs
// no allocation per frame for reading it.
const (
	readBufInitial = 512
	readBufKept    = 4 << 10
)

// readFrame reads the rest of the frame rd into the read buffer, at most
// limit+1 bytes (one more than a frame may have, to tell it is too large).
// The result is valid until the next call.
func (c *conn) readFrame(rd io.Reader, limit int) ([]byte, error) {
	buf := c.rbuf[:0]
	if buf == nil {
		buf = make([]byte, 0, min(readBufInitial, limit+1))
	}
	for len(buf) <= limit {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)] // grow
		}
		n, err := rd.Read(buf[len(buf):min(cap(buf), limit+1)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	if cap(buf) <= readBufKept {
		c.rbuf = buf[:0]
	} else {
		c.rbuf = nil
	}
	return buf, nil
}

// armReadDeadline moves the read deadline to now+readWait once a fifth of
// readWait has passed since it was last set: a socket that stays silent is
// still dropped 4/5 readWait to readWait after its last frame (over twice
// the ping interval), and a busy one does not reset a timer per frame
// (3.3% of the server's CPU with a thousand sockets acking 100 frames/s).
// Only the read loop calls it (the ping and pong handlers run inside it).
func (c *conn) armReadDeadline(now time.Time, readWait time.Duration) {
	if c.rdeadline.Sub(now) < readWait-readWait/5 {
		c.rdeadline = now.Add(readWait)
		_ = c.ws.SetReadDeadline(c.rdeadline)
	}
}

func (c *conn) readEnd(err error) string {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case errors.As(err, &ce):
		return "closed " + strconv.Itoa(ce.Code)
	case errors.Is(err, websocket.ErrReadLimit):
		c.logger().Info("frame over hard limit, closed with 1009", "limit", c.g.hardLimit)
		return "frame over hard limit"
	case errors.As(err, &ne) && ne.Timeout():
		return "read timeout"
	case errors.Is(err, net.ErrClosed):
		return "connection closed"
	default:
		return "read error: " + err.Error()
	}
}

// handleFrame processes one client frame. Every frame gets an answer or a
// visible effect: pong, SERVER_ACK (when asked), an error notice, or a
// delivery ack.
func (c *conn) handleFrame(ctx context.Context, typ int, data []byte) {
	if typ == websocket.TextMessage && string(data) == "ping" {
		c.send(frame{websocket.TextMessage, []byte("pong")})
		return
	}
	var m *schema.Message
	var err error
	if typ == websocket.TextMessage {
		m, err = schema.DecodeJSON(data)
	} else {
		m, err = schema.DecodeProto(data)
	}
	if err == nil {
		err = m.Validate()
	}
	if err != nil {
		code, id, reason := decodeFailure(err)
		c.reject(id, code, reason)
		return
	}
	if m.Type == schema.TypeClientAck {
		c.sess.Ack(m.ID)
		return
	}
	if c.limiter == nil {
		c.limiter = rate.NewLimiter(rate.Limit(c.g.cfg.RatePerSecond), c.g.burst)
	}
	if !c.limiter.Allow() {
		c.reject(m.ID, schema.CodeRateLimited, "too many messages; slow down and resend")
		return
	}
	if m.Channel == schema.ChannelGroup && !c.g.admitGroup(ctx) { // the socket is not read meanwhile
		c.reject(m.ID, schema.CodeRateLimited, busyReason)
		return
	}
	m.Stamp(c.user, newServerID(), nowMs())
	if m.Ephemeral {
		if err := c.g.publish(ctx, c.user, c.device, m); err != nil {
			c.logger().Warn("publish failed", "msg_id", m.ID, "err", err)
			c.reject(m.ID, schema.CodeUnavailable, "message not stored; resend it")
			return
		}
		c.g.metrics.accepted.Inc()
		if c.ack {
			c.send(c.render(schema.ServerAck(m)))
		}
		return
	}
	c.commitAsync(ctx, m)
}

// maxInflight is the most messages of one connection waiting for their
// CHAT_IN commit; the read loop waits for room beyond that.
const maxInflight = 64

// commitAsync hands m to the group committer without waiting for it, so
// the read loop goes on reading and a client's pipelined messages share a
// commit. The SERVER_ACK (rendered now) or the error notice is queued when
// the commit's outcome is known; commits complete in order, so acks keep
// the order of the messages.
func (c *conn) commitAsync(ctx context.Context, m *schema.Message) {
	if c.inflight == nil {
		c.inflight = make(chan struct{}, maxInflight)
	}
	select {
	case c.inflight <- struct{}{}:
	case <-ctx.Done():
		c.reject(m.ID, schema.CodeUnavailable, "server shutting down; resend it")
		return
	}
	var ack frame
	if c.ack {
		ack = c.render(schema.ServerAck(m))
	}
	id := m.ID
	c.g.commit.enqueue(&pubReq{entry: entry{data: m.MarshalProto(), device: c.device}, done: func(err error) {
		<-c.inflight
		if err != nil {
			c.logger().Warn("publish failed", "msg_id", id, "err", err)
			c.g.metrics.reject(schema.CodeUnavailable)
			c.post(c.render(schema.ErrorNotice(c.user, id, schema.CodeUnavailable, "message not stored; resend it", nowMs())))
			return
		}
		c.g.metrics.accepted.Inc()
		if c.ack {
			c.post(ack)
		}
	}})
}

// post queues f without waiting for room (the queue may exceed
// OutboundQueue by at most maxInflight answers); it drops f when the
// connection is closing.
func (c *conn) post(f frame) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closingLocked() {
		c.replyLocked(f)
	}
}

// reject sends an error notice naming the message id (when known) and
// counts the message as rejected; the socket stays open.
func (c *conn) reject(id, code, reason string) {
	c.g.metrics.reject(code)
	c.logger().Info("message rejected", "code", code, "msg_id", id)
	c.send(c.render(schema.ErrorNotice(c.user, id, code, reason, nowMs())))
}

// decodeFailure maps a decode or validation error to the client-facing
// code, id and reason.
func decodeFailure(err error) (code, id, reason string) {
	var de *schema.DecodeError
	if errors.As(err, &de) {
		return de.Code, de.ID, de.Reason
	}
	return schema.CodeMalformed, "", "invalid message"
}
