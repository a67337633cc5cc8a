package gateway

import (
	"runtime"
	"strings"
	"testing"

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
