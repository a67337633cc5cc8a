package gateway

import (
	"bytes"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/vartalap/vartalap/schema"
)

// BenchmarkWritePath measures Sink.Deliver → render → write loop → socket,
// with a real client reading the frames.
func BenchmarkWritePath(b *testing.B) {
	m := &schema.Message{Version: 2.1, ID: "bench-1", Type: schema.TypeMessage, Channel: schema.ChannelIndividual,
		Source: "bob", Destination: "alice", Content: []byte(`{"text":"` + strings.Repeat("a", 200) + `"}`),
		Timestamp: 1700000000000, Meta: map[string]string{"chatid": "c1", "contentType": "text", "action": "message"},
		ServerID: "AAAAAAAAAAAAAAAAAAAAAA", ServerTimestamp: 1700000000001}
	for _, format := range []string{"text", "binary"} {
		b.Run(format, func(b *testing.B) {
			e := newEnv(b)
			ws := e.dial(b, "format="+format, nil)
			sink := e.del.lastSession(b, "alice").sink
			got := make(chan error, 1)
			b.ReportAllocs()
			b.ResetTimer()
			go func() {
				for range b.N {
					if _, _, err := ws.ReadMessage(); err != nil {
						got <- err
						return
					}
				}
				got <- nil
			}()
			for range b.N {
				for !sink.Deliver(m) {
					runtime.Gosched()
				}
			}
			if err := <-got; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkReadPath measures a client's CLIENT_ACK frames through the read
// loop (frame read, decode, validation) to the session's Ack, over a real
// socket. The client writes the frames, masked as RFC 6455 requires, in
// large writes of its own, so the server's reading sets the pace.
func BenchmarkReadPath(b *testing.B) {
	ack := &schema.Message{Version: 2.1, ID: "bench-1", Type: schema.TypeClientAck, Destination: "server"}
	for _, format := range []string{"text", "binary"} {
		b.Run(format, func(b *testing.B) {
			op, payload := byte(websocket.BinaryMessage), ack.MarshalProto()
			if format == "text" {
				op, payload = websocket.TextMessage, []byte(`{"_v":2.1,"id":"bench-1","head":{"type":"INDIVIDUAL","to":"server","contentType":"CLIENT_ACK"},"body":{}}`)
			}
			// One masked client frame (FIN, opcode; mask bit, length < 126).
			frame := append([]byte{0x80 | op, 0x80 | byte(len(payload)), 1, 2, 3, 4}, payload...)
			for i := range payload {
				frame[6+i] ^= frame[2+i%4]
			}
			const perWrite = 256
			chunk := bytes.Repeat(frame, perWrite)

			e := newEnv(b)
			ws := e.dial(b, "format="+format, nil)
			nc := ws.NetConn()
			sess := e.del.lastSession(b, "alice")
			sess.mu.Lock()
			sess.acks = make([]string, 0, b.N)
			sess.mu.Unlock()
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			b.ResetTimer()
			for left := b.N; left > 0; left -= perWrite {
				if _, err := nc.Write(chunk[:min(left, perWrite)*len(frame)]); err != nil {
					b.Fatal(err)
				}
			}
			for deadline := time.Now().Add(time.Minute); ; {
				sess.mu.Lock()
				n := len(sess.acks)
				sess.mu.Unlock()
				if n == b.N {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d acks arrived", n, b.N)
				}
				time.Sleep(100 * time.Microsecond)
			}
		})
	}
}
