package gateway

import (
	"bufio"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// corkBytes is the most a corked socket buffers before it writes: a batch
// of small frames becomes one write; a large one goes out in pieces of
// about this size.
const corkBytes = 64 << 10

// corkPool holds the buffers of corked sockets. A socket holds one only
// between cork and uncork, so idle sockets cost nothing.
var corkPool = sync.Pool{New: func() any { b := make([]byte, 0, 8<<10); return &b }}

// corkConn is the network connection under a WebSocket. While corked (the
// writer has several frames queued) writes collect in a buffer that uncork
// sends with one system call: a socket of a busy group member gets its
// frames in one write instead of one each. Uncorked, writes go straight
// through (the handshake, pongs written by the read loop).
//
// Every write to the connection holds mu, so a pong written meanwhile
// never lands inside the buffered frames; the WebSocket library writes
// each frame whole, under a lock of its own.
type corkConn struct {
	net.Conn
	writes prometheus.Counter // one per system write

	mu       sync.Mutex
	buf      *[]byte   // from corkPool while corked; nil: uncorked
	deadline time.Time // the write deadline last set on Conn
}

// SetWriteDeadline sets the deadline on the connection unless it is
// already set. The WebSocket library sets it before every frame and the
// writer re-arms it only now and then (see conn.armWriteDeadline), so most
// frames skip a timer update.
func (c *corkConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.Equal(c.deadline) {
		return nil
	}
	c.deadline = t
	return c.Conn.SetWriteDeadline(t)
}

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf == nil {
		c.writes.Inc()
		return c.Conn.Write(p)
	}
	*c.buf = append(*c.buf, p...)
	if len(*c.buf) >= corkBytes {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// cork starts buffering writes.
func (c *corkConn) cork() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf == nil {
		c.buf = corkPool.Get().(*[]byte)
	}
}

// uncork writes what was buffered since cork and stops buffering. The
// error is that of the write (under the deadline last set).
func (c *corkConn) uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf == nil {
		return nil
	}
	err := c.flushLocked()
	if cap(*c.buf) <= 4*corkBytes {
		corkPool.Put(c.buf)
	}
	c.buf = nil
	return err
}

func (c *corkConn) flushLocked() error {
	b := *c.buf
	*c.buf = b[:0]
	if len(b) == 0 {
		return nil
	}
	c.writes.Inc()
	_, err := c.Conn.Write(b)
	return err
}

// corkingWriter hands the WebSocket upgrader a corkConn when it hijacks
// the HTTP connection.
type corkingWriter struct {
	http.ResponseWriter
	conn   *corkConn // set by Hijack
	writes prometheus.Counter
}

func (w *corkingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.conn = &corkConn{Conn: nc, writes: w.writes}
	return w.conn, brw, nil
}

// Unwrap lets http.ResponseController reach the writer underneath.
func (w *corkingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
