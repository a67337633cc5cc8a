package main

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// countingConn counts the writes that reach the network.
type countingConn struct {
	net.Conn
	writes int
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes++
	return c.Conn.Write(p)
}

// Deferred acks go out together, before the reader waits for the network,
// or ahead of the next send; bytes keep their order.
func TestAckConn(t *testing.T) {
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	cc := &countingConn{Conn: a}
	c := &ackConn{Conn: cc}
	got := make(chan []byte, 1)
	go func() {
		var all bytes.Buffer
		buf := make([]byte, 64)
		for all.Len() < len("ack1ack2ack3SENDack4") {
			n, err := b.Read(buf)
			if err != nil {
				break
			}
			all.Write(buf[:n])
		}
		got <- all.Bytes()
	}()
	c.deferring(true)
	for _, s := range []string{"ack1", "ack2", "ack3"} {
		if _, err := c.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	c.deferring(false)
	if cc.writes != 0 {
		t.Fatalf("%d writes before any read or send, want 0", cc.writes)
	}
	if _, err := c.Write([]byte("SEND")); err != nil { // acks first, one write
		t.Fatal(err)
	}
	if cc.writes != 1 {
		t.Fatalf("%d writes for three acks and a send, want 1", cc.writes)
	}
	c.deferring(true)
	_, _ = c.Write([]byte("ack4"))
	c.deferring(false)
	go func() { _, _ = b.Write([]byte("z")) }()
	// The read flushes ack4 before it waits.
	done := make(chan struct{})
	go func() {
		defer close(done)
		p := make([]byte, 1)
		_, _ = io.ReadFull(c, p)
	}()
	select {
	case s := <-got:
		if string(s) != "ack1ack2ack3SENDack4" {
			t.Fatalf("peer read %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("deferred ack not flushed by the read")
	}
	<-done
	if cc.writes != 2 {
		t.Fatalf("%d writes, want 2", cc.writes)
	}
}
