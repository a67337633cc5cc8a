package main

import (
	"net"
	"sync"
	"time"
)

// ackConn is the network connection under a simulated client's WebSocket.
// CLIENT_ACK frames written while it is deferring collect in a buffer that
// goes out before the reader next waits for the network, or ahead of the
// next send: one write acknowledges every message that arrived in one read,
// still one CLIENT_ACK frame per message. A mobile client's buffered socket
// does the same; writing each ack alone made the load tool spend half its
// CPU in write(2) and left less of the shared machine to the server.
type ackConn struct {
	net.Conn

	mu      sync.Mutex
	deferOn bool   // buffer writes instead of sending them
	buf     []byte // deferred frames
	err     error  // the first failed flush; later writes return it

	deadline time.Time // the write deadline last set on Conn
}

// SetWriteDeadline skips a deadline already set: the WebSocket library
// sets one before every frame, and the session re-arms it only now and then.
func (c *ackConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.Equal(c.deadline) {
		return nil
	}
	c.deadline = t
	return c.Conn.SetWriteDeadline(t)
}

// deferring makes the writes until the next call buffer (on) or go out (off).
func (c *ackConn) deferring(on bool) {
	c.mu.Lock()
	c.deferOn = on
	c.mu.Unlock()
}

func (c *ackConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if c.deferOn && len(c.buf)+len(p) <= 64<<10 {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	if len(c.buf) > 0 { // keep the order: deferred acks first
		c.buf = append(c.buf, p...)
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// Read sends the deferred acks before it waits for more frames.
func (c *ackConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.buf) > 0 {
		_ = c.flushLocked() // a failed write fails the next Write too
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

func (c *ackConn) flushLocked() error {
	_, err := c.Conn.Write(c.buf)
	c.buf = c.buf[:0]
	if err != nil {
		c.err = err
	}
	return err
}
