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

// conn is one WebSocket connection. The HTTP handler goroutine runs its read
// loop; one write loop goroutine, joined by the handler, owns every data
// write. Deliver and Close (the Sink) may be called from any goroutine.
type conn struct {
	g       *Gateway
	ws      *websocket.Conn // set once, before the write loop starts
	id      string
	user    schema.UserID
	device  schema.DeviceID
	binary  bool // server frames are protobuf (format=binary), else JSON text
	ack     bool // SERVER_ACK for every accepted message (ack=true)
	log     *slog.Logger
	limiter *rate.Limiter
	sess    Session

	out         chan frame    // bounded outbound queue
	closeOnce   sync.Once     // guards closeCode, closeReason, closeReq
	closeReq    chan struct{} // closed by Close: the write loop sends the close frame
	closeCode   int
	closeReason string
	done        chan struct{} // closed when the read loop has ended
	writerDone  chan struct{} // closed when the write loop has ended
}

// Deliver implements Sink: render m for this connection and enqueue it
// without blocking. False means the queue is full or the socket is closing.
func (c *conn) Deliver(m *schema.Message) bool {
	if c.closing() {
		return false
	}
	select {
	case c.out <- c.render(m):
		return true
	default:
		return false
	}
}

// Close implements Sink: ask the write loop to close the socket with code
// and reason. Non-blocking; only the first call counts.
func (c *conn) Close(code int, reason string) {
	c.closeOnce.Do(func() {
		if len(reason) > maxCloseReason {
			reason = reason[:maxCloseReason]
		}
		c.closeCode, c.closeReason = code, reason
		close(c.closeReq)
	})
}

func (c *conn) closing() bool {
	select {
	case <-c.closeReq:
		return true
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *conn) render(m *schema.Message) frame {
	if c.binary {
		return frame{websocket.BinaryMessage, m.MarshalProto()}
	}
	return frame{websocket.TextMessage, schema.RenderJSON(m)}
}

// send enqueues a frame produced by the read loop (pong, SERVER_ACK, error
// notice). It waits for room: a client that does not read its acks stops
// being read (backpressure) until the write timeout closes it.
func (c *conn) send(f frame) bool {
	select {
	case c.out <- f:
		return true
	case <-c.closeReq:
		return false
	case <-c.writerDone:
		return false
	}
}

// serveWS authenticates, opens the delivery session, upgrades and runs the
// connection until it ends.
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
		g:          g,
		id:         "c" + strconv.FormatUint(g.connSeq.Add(1), 10),
		user:       id.User,
		device:     id.Device,
		binary:     q.Get("format") == "binary",
		ack:        q.Get("ack") == "true",
		limiter:    rate.NewLimiter(rate.Limit(g.cfg.RatePerSecond), g.burst),
		out:        make(chan frame, g.cfg.OutboundQueue),
		closeReq:   make(chan struct{}),
		done:       make(chan struct{}),
		writerDone: make(chan struct{}),
	}
	c.log = g.log.With("conn_id", c.id, "user", string(c.user), "device", string(c.device))
	if err := g.register(c); err != nil {
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "server shutting down")
		return
	}
	defer g.unregister(c)

	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	sess, err := g.cfg.Delivery.Open(ctx, c.user, c.device, c)
	if err != nil {
		c.log.Error("open delivery session", "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "delivery unavailable")
		return
	}
	c.sess = sess
	ws, err := g.upgrader.Upgrade(w, r, nil)
	if err != nil {
		sess.Close()
		c.log.Info("websocket upgrade failed", "err", err)
		return
	}
	c.ws = ws
	c.run(ctx, r)
}

func (c *conn) run(ctx context.Context, r *http.Request) {
	start := time.Now()
	readWait := c.g.cfg.PingInterval * 5 / 2
	c.ws.SetReadLimit(c.g.hardLimit)
	_ = c.ws.SetReadDeadline(start.Add(readWait))
	c.ws.SetPongHandler(func(string) error {
		return c.ws.SetReadDeadline(time.Now().Add(readWait))
	})
	c.ws.SetPingHandler(func(data string) error {
		_ = c.ws.SetReadDeadline(time.Now().Add(readWait))
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
	c.log.Info("connected", "remote", r.RemoteAddr, "origin", r.Header.Get("Origin"), "format", format, "ack", c.ack)

	go c.writeLoop()
	reason := c.readLoop(ctx, readWait)
	close(c.done)
	<-c.writerDone
	_ = c.ws.Close()
	c.sess.Close()
	c.log.Info("disconnected", "reason", reason, "duration", time.Since(start).Round(time.Millisecond))
}

// writeLoop writes queued frames and pings; on a close request it sends the
// close frame and gives the peer WriteTimeout to answer before dropping the
// TCP connection. Any write error drops the connection, which ends the read
// loop.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	wt := c.g.cfg.WriteTimeout
	ping := time.NewTicker(c.g.cfg.PingInterval)
	defer ping.Stop()
	for {
		select { // a close request wins over queued frames
		case <-c.closeReq:
			c.writeClose()
			return
		case <-c.done:
			return
		default:
		}
		select {
		case f := <-c.out:
			_ = c.ws.SetWriteDeadline(time.Now().Add(wt))
			if err := c.ws.WriteMessage(f.typ, f.data); err != nil {
				c.log.Info("write failed", "err", err)
				_ = c.ws.Close()
				return
			}
		case <-ping.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(wt)); err != nil {
				c.log.Info("ping failed", "err", err)
				_ = c.ws.Close()
				return
			}
		case <-c.closeReq:
			c.writeClose()
			return
		case <-c.done:
			return
		}
	}
}

func (c *conn) writeClose() {
	wt := c.g.cfg.WriteTimeout
	msg := websocket.FormatCloseMessage(c.closeCode, c.closeReason)
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
		_ = c.ws.SetReadDeadline(time.Now().Add(readWait))
		data, err := io.ReadAll(io.LimitReader(rd, int64(maxFrame)+1))
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

func (c *conn) readEnd(err error) string {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case errors.As(err, &ce):
		return "closed " + strconv.Itoa(ce.Code)
	case errors.Is(err, websocket.ErrReadLimit):
		c.log.Info("frame over hard limit, closed with 1009", "limit", c.g.hardLimit)
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
	if !c.limiter.Allow() {
		c.reject(m.ID, schema.CodeRateLimited, "too many messages; slow down and resend")
		return
	}
	m.Stamp(c.user, newServerID(), nowMs())
	if err := c.g.publish(ctx, c.user, c.device, m); err != nil {
		c.log.Warn("publish failed", "msg_id", m.ID, "err", err)
		c.reject(m.ID, schema.CodeUnavailable, "message not stored; resend it")
		return
	}
	if c.ack {
		c.send(c.render(schema.ServerAck(m)))
	}
}

// reject sends an error notice naming the message id (when known); the
// socket stays open.
func (c *conn) reject(id, code, reason string) {
	c.log.Info("message rejected", "code", code, "msg_id", id)
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
