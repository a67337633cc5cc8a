package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vartalap/vartalap/schema"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestCorkConn(t *testing.T) {
	client, server := tcpPair(t)
	writes := prometheus.NewCounter(prometheus.CounterOpts{Name: "w"})
	c := &corkConn{Conn: server, writes: writes}
	var want bytes.Buffer
	write := func(p []byte) {
		t.Helper()
		if n, err := c.Write(p); err != nil || n != len(p) {
			t.Fatalf("write: %d, %v", n, err)
		}
		want.Write(p)
	}
	expectWrites := func(n float64) {
		t.Helper()
		if got := testutil.ToFloat64(writes); got != n {
			t.Fatalf("%v system writes, want %v", got, n)
		}
	}

	write([]byte("through")) // uncorked: straight to the socket
	expectWrites(1)

	c.cork()
	for i := range 10 {
		write(fmt.Appendf(nil, "frame %d;", i))
	}
	expectWrites(1) // all buffered
	// Nothing reached the peer yet: what it can read now is only the first write.
	got := make([]byte, 64)
	_ = client.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	n, _ := client.Read(got)
	if string(got[:n]) != "through" {
		t.Fatalf("peer read %q before uncork, want only %q", got[:n], "through")
	}
	if err := c.uncork(); err != nil {
		t.Fatal(err)
	}
	expectWrites(2) // ten frames, one write

	// Past corkBytes the buffer goes out while still corked.
	c.cork()
	big := bytes.Repeat([]byte("x"), corkBytes/2+1)
	write(big)
	expectWrites(2)
	write(big) // over corkBytes: written
	expectWrites(3)
	write([]byte("tail"))
	if err := c.uncork(); err != nil {
		t.Fatal(err)
	}
	expectWrites(4)
	if err := c.uncork(); err != nil { // not corked: nothing to do
		t.Fatal(err)
	}
	expectWrites(4)

	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest := make([]byte, want.Len()-n)
	if _, err := io.ReadFull(client, rest); err != nil {
		t.Fatalf("read: %v", err)
	}
	if all := append(got[:n:n], rest...); !bytes.Equal(all, want.Bytes()) {
		t.Fatalf("peer got %d bytes differing from the %d written", len(all), want.Len())
	}
}

// A failed flush reports the error (the writer then closes the socket).
func TestCorkConnWriteError(t *testing.T) {
	_, server := tcpPair(t)
	c := &corkConn{Conn: server, writes: prometheus.NewCounter(prometheus.CounterOpts{Name: "w"})}
	c.cork()
	if _, err := c.Write([]byte("queued")); err != nil {
		t.Fatalf("corked write: %v", err)
	}
	server.Close()
	if err := c.uncork(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("uncork on a closed socket: %v, want net.ErrClosed", err)
	}
	if c.buf != nil {
		t.Fatal("still corked after uncork")
	}
}

// Frames queued while the writer was not running go out in one system
// write, each intact and in order, large ones included.
func TestFramesQueuedTogetherShareAWrite(t *testing.T) {
	e := newEnv(t)
	m := e.g.metrics
	const n = 50
	e.del.onOpen = func(s Sink) { // before the upgrade: the frames wait for the socket
		for i := range n {
			content := []byte("hello")
			if i == n-1 {
				content = bytes.Repeat([]byte("y"), 2*corkBytes) // flushed in pieces
			}
			s.Deliver(&schema.Message{Version: 2.1, ID: fmt.Sprintf("q%d", i), Type: schema.TypeMessage,
				Channel: schema.ChannelIndividual, Source: "bob", Destination: "alice", Content: content})
		}
	}
	ws := e.dial(t, "", nil)
	for i := range n {
		_, data := read(t, ws)
		msg, err := schema.DecodeJSON(data)
		if err != nil || msg.ID != fmt.Sprintf("q%d", i) {
			t.Fatalf("frame %d: %q… (%v)", i, data[:min(len(data), 80)], err)
		}
	}
	waitValue(t, "frames written", m.frames, n)
	// The handshake, then the queue: the small frames in one write, the
	// large last one in pieces of corkBytes.
	if got := testutil.ToFloat64(m.writes); got < 2 || got > 2+3 {
		t.Fatalf("%v socket writes for %d queued frames", got, n)
	}
}

// deadlineCounter counts the deadlines that reach the socket.
type deadlineCounter struct {
	net.Conn
	sets int
}

func (d *deadlineCounter) SetWriteDeadline(t time.Time) error {
	d.sets++
	return d.Conn.SetWriteDeadline(t)
}

// The library sets the write deadline before every frame; corkConn passes
// on only a changed one, and a changed one still takes effect.
func TestCorkConnDeadlineSetOnce(t *testing.T) {
	client, server := tcpPair(t)
	dc := &deadlineCounter{Conn: server}
	c := &corkConn{Conn: dc, writes: prometheus.NewCounter(prometheus.CounterOpts{Name: "w"})}
	d := time.Now().Add(time.Minute)
	for range 100 {
		if err := c.SetWriteDeadline(d); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if dc.sets != 1 {
		t.Fatalf("%d deadlines reached the socket, want 1", dc.sets)
	}
	// A deadline in the past fails the next write that has to wait.
	if err := c.SetWriteDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("y")); err == nil {
		t.Fatal("write after an expired deadline succeeded")
	}
	if dc.sets != 2 {
		t.Fatalf("%d deadlines reached the socket, want 2", dc.sets)
	}
	_ = client
}

// A message delivered to many sockets is encoded once per format, and each
// socket still gets its own format.
func TestRenderShared(t *testing.T) {
	g := &Gateway{}
	bin, txt := &conn{g: g, binary: true}, &conn{g: g}
	m := &schema.Message{Version: 3, ID: "m1", Type: schema.TypeMessage, Channel: schema.ChannelGroup, Source: "alice", Destination: "team", Content: []byte(`{"text":"hi"}`)}
	b1, b2 := bin.render(m), (&conn{g: g, binary: true}).render(m)
	if &b1.data[0] != &b2.data[0] {
		t.Fatal("the same message was encoded twice for binary sockets")
	}
	if !bytes.Equal(b1.data, m.MarshalProto()) || b1.typ != websocket.BinaryMessage {
		t.Fatal("binary frame differs from MarshalProto")
	}
	j := txt.render(m)
	if !bytes.Equal(j.data, schema.RenderJSON(m)) || j.typ != websocket.TextMessage {
		t.Fatal("text frame differs from RenderJSON")
	}
	other := &schema.Message{Version: 3, ID: "m2", Type: schema.TypeMessage, Channel: schema.ChannelGroup, Source: "alice", Destination: "team"}
	if b3 := bin.render(other); !bytes.Equal(b3.data, other.MarshalProto()) {
		t.Fatal("a second message got the first one's frame")
	}
}

// Frames to a busy socket wait WriteCoalesce and share one write; a
// frame to a socket without that history, quiet for longer, followed by a
// Flush or by an answer to the client goes out at once.
func TestWriteCoalesce(t *testing.T) {
	const coalesce = 2 * time.Second
	e := newEnv(t, withConfig(func(c *Config) { c.WriteCoalesce = coalesce }))
	m := e.g.metrics
	ws := e.dial(t, "", nil)
	sink := e.del.lastSession(t, "alice").sink
	deliver := func(id string) {
		t.Helper()
		if !sink.Deliver(&schema.Message{Version: 2.1, ID: id, Type: schema.TypeMessage,
			Channel: schema.ChannelIndividual, Source: "bob", Destination: "alice", Content: []byte("hi")}) {
			t.Fatalf("deliver %s refused", id)
		}
	}
	expect := func(id string, within time.Duration) {
		t.Helper()
		_ = ws.SetReadDeadline(time.Now().Add(within))
		_, data, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("reading %s: %v", id, err)
		}
		if msg, err := schema.DecodeJSON(data); err != nil || msg.ID != id {
			t.Fatalf("got %q (%v), want %s", data, err, id)
		}
	}
	waitValue(t, "socket writes", m.writes, 1) // the handshake

	// No history yet: each at once. Two frames close together make the
	// socket busy.
	deliver("m0")
	expect("m0", coalesce*3/4)
	deliver("m1")
	expect("m1", coalesce*3/4)
	waitValue(t, "socket writes", m.writes, 3)

	start := time.Now()
	const held = coalesceFrames - 2 // fewer than wake the writer
	for i := 2; i < 2+held; i++ {   // busy: they wait, together
		deliver(fmt.Sprintf("m%d", i))
		time.Sleep(time.Millisecond)
	}
	for i := 2; i < 2+held; i++ {
		expect(fmt.Sprintf("m%d", i), 10*time.Second)
	}
	if waited := time.Since(start); waited < coalesce/2 {
		t.Fatalf("frames to a busy socket came after %v, want them held about %v", waited, coalesce)
	}
	waitValue(t, "frames written", m.frames, 2+held)
	if got := testutil.ToFloat64(m.writes); got != 4 {
		t.Fatalf("%v socket writes for the handshake and %d frames, want 4", got, 2+held)
	}

	deliver("f") // busy: held, until a Flush (after a catch-up)
	sink.Flush()
	expect("f", coalesce*3/4)

	deliver("r") // busy: held, until the server answers the client
	writeText(t, ws, "ping")
	expect("r", coalesce*3/4)
	_ = ws.SetReadDeadline(time.Now().Add(coalesce * 3 / 4))
	if _, data, err := ws.ReadMessage(); err != nil || string(data) != "pong" {
		t.Fatalf("pong: %q, %v", data, err)
	}

	time.Sleep(coalesce + 100*time.Millisecond) // quiet: at once again
	deliver("q")
	expect("q", coalesce*3/4)
}

// The rules of coalesceWait, one by one.
func TestCoalesceWait(t *testing.T) {
	const d = 10 * time.Second // long, so the test's own pauses do not count
	now := time.Now()
	c := &conn{g: &Gateway{cfg: Config{WriteCoalesce: d}}}
	if w := c.coalesceWait(now); w != 0 {
		t.Fatalf("never written: wait %v, want 0", w)
	}
	c.noteWrite(now.Add(-10*time.Millisecond), 1)
	if w := c.coalesceWait(now); w != 0 {
		t.Fatalf("written once (no frame gap known): wait %v, want 0", w)
	}
	c.noteWrite(now.Add(-5*time.Millisecond), 1)
	if c.frameGap != 5*time.Millisecond {
		t.Fatalf("frame gap %v after writes 5ms apart", c.frameGap)
	}
	if w := c.coalesceWait(now); w < d/2 || w > d {
		t.Fatalf("busy: wait %v, want about %v", w, d)
	}
	if w := c.coalesceWait(now.Add(-d)); w > 0 {
		t.Fatalf("frames found %v ago: wait %v, want 0", d, w)
	}
	if w := c.coalesceWait(now.Add(d)); w != 0 {
		t.Fatalf("quiet for WriteCoalesce since the last write: wait %v, want 0", w)
	}
	c.q = make([]frame, coalesceFrames)
	if w := c.coalesceWait(now); w != 0 {
		t.Fatalf("%d frames queued: wait %v, want 0", coalesceFrames, w)
	}
	c.q = nil
	// Four frames in one write 40 s after the last: 10 s apart on average,
	// and the moving average moves a quarter of the way.
	c.noteWrite(c.lastWrite.Add(40*time.Second), 4)
	if want := 5*time.Millisecond + (10*time.Second-5*time.Millisecond)/4; c.frameGap != want {
		t.Fatalf("frame gap %v, want %v", c.frameGap, want)
	}
	c.frameGap = time.Millisecond
	c.g.cfg.WriteCoalesce = -1
	if w := c.coalesceWait(c.lastWrite); w != 0 {
		t.Fatalf("coalescing off: wait %v, want 0", w)
	}
}

// A writer holding frames for a busy socket writes as soon as
// coalesceFrames are queued, so a fast stream does not fill the queue.
func TestWriteCoalesceWakesOnFullBatch(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.WriteCoalesce = time.Minute }))
	ws := e.dial(t, "", nil)
	sink := e.del.lastSession(t, "alice").sink
	for i := range 2 + coalesceFrames { // two alone (now busy), then a batch
		if !sink.Deliver(&schema.Message{Version: 2.1, ID: fmt.Sprintf("m%d", i), Type: schema.TypeMessage,
			Channel: schema.ChannelIndividual, Source: "bob", Destination: "alice", Content: []byte("hi")}) {
			t.Fatalf("deliver m%d refused", i)
		}
		if i >= 2 {
			continue
		}
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, _, err := ws.ReadMessage(); err != nil {
			t.Fatalf("m%d: %v", i, err)
		}
	}
	for i := 2; i < 2+coalesceFrames; i++ {
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, data, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("m%d held back (WriteCoalesce is a minute): %v", i, err)
		}
		if msg, err := schema.DecodeJSON(data); err != nil || msg.ID != fmt.Sprintf("m%d", i) {
			t.Fatalf("got %q (%v), want m%d", data, err, i)
		}
	}
}

// readFrame returns the whole frame (or limit+1 bytes of a larger one)
// whatever the chunks its reader gives, reuses its buffer for frames up to
// readBufKept and lets larger buffers go.
func TestReadFrame(t *testing.T) {
	const limit = 10_000
	chunked := map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one byte": iotest.OneByteReader,
		"halves":   iotest.HalfReader,
		"data+EOF": iotest.DataErrReader,
	}
	for name, wrap := range chunked {
		for _, n := range []int{0, 1, readBufInitial - 1, readBufInitial, readBufInitial + 1, 3000, limit, limit + 1, limit + 500} {
			c := &conn{}
			frame := bytes.Repeat([]byte("abcdefghijklmnopq"), n/17+1)[:n]
			got, err := c.readFrame(wrap(bytes.NewReader(frame)), limit)
			if err != nil {
				t.Fatalf("%s, %d bytes: %v", name, n, err)
			}
			want := frame[:min(n, limit+1)]
			if !bytes.Equal(got, want) {
				t.Fatalf("%s, %d bytes: got %d bytes, want %d", name, n, len(got), len(want))
			}
			if kept := c.rbuf != nil; kept != (cap(got) <= readBufKept) {
				t.Fatalf("%s, %d bytes: buffer of %d kept: %v", name, n, cap(got), kept)
			}
		}
	}

	// A small frame after another reuses its buffer.
	c := &conn{}
	first, _ := c.readFrame(strings.NewReader("first frame"), limit)
	second, _ := c.readFrame(strings.NewReader("second"), limit)
	if &first[:1][0] != &second[:1][0] || string(second) != "second" {
		t.Fatalf("second frame %q not read into the first's buffer", second)
	}
	// A reader's error is returned.
	boom := errors.New("boom")
	if _, err := c.readFrame(io.MultiReader(strings.NewReader("part"), iotest.ErrReader(boom)), limit); !errors.Is(err, boom) {
		t.Fatalf("reader error: got %v", err)
	}
}

// The writer takes at most maxWriteBatch frames per write: frames count
// against OutboundQueue until their batch is written, and a client acks the
// first frames of a batch before the last are out (the Deliverer then sends
// more), so an unbounded batch let a fast client overflow the queue.
func TestWriteBatchBounded(t *testing.T) {
	var mu sync.Mutex
	var sizes []int
	testWriteBatch = func(n int) {
		mu.Lock()
		defer mu.Unlock()
		sizes = append(sizes, n)
	}
	t.Cleanup(func() { testWriteBatch = nil })
	e := newEnv(t)
	ws := e.dial(t, "format=binary", nil)
	sess := e.del.lastSession(t, "alice")
	const n = 3*maxWriteBatch + 10
	for i := range n {
		m := &schema.Message{Version: 2.1, ID: "m" + strconv.Itoa(i), Type: schema.TypeMessage, Channel: schema.ChannelIndividual,
			Source: "bob", Destination: "alice", Content: []byte(`{"text":"hi"}`)}
		if !sess.sink.Deliver(m) {
			t.Fatalf("Deliver %d refused", i)
		}
	}
	for i := range n {
		if _, data := read(t, ws); parseBinaryID(t, data) != "m"+strconv.Itoa(i) {
			t.Fatalf("frame %d out of order", i)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	total := 0
	for _, s := range sizes {
		total += s
		if s > maxWriteBatch {
			t.Fatalf("a batch of %d frames, more than %d", s, maxWriteBatch)
		}
	}
	if total != n {
		t.Fatalf("batches of %v frames, %d in all, want %d", sizes, total, n)
	}
}

func parseBinaryID(t testing.TB, data []byte) string {
	t.Helper()
	m, err := schema.UnmarshalProto(data)
	if err != nil {
		t.Fatalf("frame does not decode: %v", err)
	}
	return m.ID
}
