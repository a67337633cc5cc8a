package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/vartalap/vartalap/schema"
)

// benchConfig is what `vartalap bench` is told.
type benchConfig struct {
	Scenario      string
	URL           string
	Users         int
	Duration      time.Duration
	Rate          int
	Window        int
	Size          int
	GroupSize     int
	Senders       int
	Backlog       int
	Conversations int
	Procs         int
	JSON          bool
	ServerPID     int
	MetricsURL    string
	Prefix        string
	CPUProfile    string
	DiskProbe     string
	Concurrency   int
	Format        string
	workerIndex   int
	workers       int
}

// benchResult is one run's figures; results of worker processes are merged.
type benchResult struct {
	Scenario       string  `json:"scenario"`
	Users          int     `json:"users"`
	Seconds        float64 `json:"seconds"`
	Connected      int64   `json:"connected"`
	ConnectFailed  int64   `json:"connect_failed"`
	ConnectSeconds float64 `json:"connect_seconds"`
	Drops          int64   `json:"drops"`
	Sent           int64   `json:"sent"`
	ServerAcked    int64   `json:"server_acked"`
	Delivered      int64   `json:"delivered"`
	// SendSeconds is how long messages were sent; DeliveredSending is what
	// was delivered by its end: the rate the server kept up with, without
	// the drain of a backlog.
	SendSeconds      float64 `json:"send_seconds,omitempty"`
	DeliveredSending int64   `json:"delivered_while_sending,omitempty"`
	Duplicates       int64   `json:"duplicates"`
	Undelivered      int64   `json:"undelivered"` // server-acked but not received by the end of the drain
	Errors           int64   `json:"errors"`
	AckLatency       *hist   `json:"ack_latency"`
	E2ELatency       *hist   `json:"e2e_latency"`
	CatchUpSeconds   float64 `json:"catch_up_seconds"`
	// Groups and GroupMembers describe the groups a group run made: a
	// group's members are all sessions of one worker, so a worker with
	// fewer sessions than --group-size makes smaller groups.
	Groups       int   `json:"groups,omitempty"`
	GroupMembers int   `json:"group_members,omitempty"` // the smallest group's
	RSSBeforeKiB int64 `json:"rss_before_kib,omitempty"`
	RSSAfterKiB  int64 `json:"rss_after_kib,omitempty"`
	// CPU time used while sending, in seconds: the load tool's own (all its
	// processes) and the server's (with --server-pid or --server-metrics).
	ToolCPUSeconds   float64 `json:"tool_cpu_seconds,omitempty"`
	ServerCPUSeconds float64 `json:"server_cpu_seconds,omitempty"`
	// CalibrationNs is this machine's time to decode a chat frame
	// (schema.DecodeJSON) just before the run (see calibrate).
	CalibrationNs float64 `json:"calibration_ns,omitempty"`
	// DiskFsync holds the times of the disk probe's 4-KiB write+fsyncs
	// during the run (see startDiskProbe); nil without --disk-probe.
	DiskFsync    *hist    `json:"disk_fsync,omitempty"`
	ErrorSamples []string `json:"error_samples,omitempty"`
}

func newResult(c *benchConfig) *benchResult {
	return &benchResult{Scenario: c.Scenario, AckLatency: newHist(), E2ELatency: newHist()}
}

func (r *benchResult) merge(o *benchResult) {
	r.Users += o.Users
	r.Seconds = max(r.Seconds, o.Seconds)
	r.Connected += o.Connected
	r.ConnectFailed += o.ConnectFailed
	r.ConnectSeconds = max(r.ConnectSeconds, o.ConnectSeconds)
	r.Drops += o.Drops
	r.Sent += o.Sent
	r.ServerAcked += o.ServerAcked
	r.Delivered += o.Delivered
	r.SendSeconds = max(r.SendSeconds, o.SendSeconds)
	r.ToolCPUSeconds += o.ToolCPUSeconds
	r.ServerCPUSeconds = max(r.ServerCPUSeconds, o.ServerCPUSeconds) // each worker measured the same server
	r.DeliveredSending += o.DeliveredSending
	r.Duplicates += o.Duplicates
	r.Undelivered += o.Undelivered
	r.Groups += o.Groups
	if o.GroupMembers > 0 && (r.GroupMembers == 0 || o.GroupMembers < r.GroupMembers) {
		r.GroupMembers = o.GroupMembers
	}
	r.Errors += o.Errors
	r.AckLatency.merge(o.AckLatency)
	r.E2ELatency.merge(o.E2ELatency)
	r.CatchUpSeconds = max(r.CatchUpSeconds, o.CatchUpSeconds)
	r.RSSAfterKiB = max(r.RSSAfterKiB, o.RSSAfterKiB)
	if len(r.ErrorSamples) < 5 {
		r.ErrorSamples = append(r.ErrorSamples, o.ErrorSamples...)
	}
}

const benchUsage = `usage: vartalap bench <scenario> [flags]

Drives a running server over real HTTP and WebSockets (dev auth) and measures.
Scenarios:
  connect    N idle authenticated sessions held for --duration
  direct     1:1 messages between pairs at --rate msgs/s (0 = flat out)
  group      groups of --group-size with --senders senders each
  sync       a user with a backlog of --backlog messages from --conversations senders connects
  reconnect  N sessions drop at once and reconnect; each has one pending message
`

func parseBench(args []string, stderr io.Writer) (*benchConfig, error) {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		fmt.Fprint(stderr, benchUsage)
		return nil, errUsage
	}
	c := &benchConfig{Scenario: args[0]}
	switch c.Scenario {
	case "connect", "direct", "group", "sync", "reconnect":
	default:
		fmt.Fprint(stderr, benchUsage)
		return nil, fmt.Errorf("unknown scenario %q", c.Scenario)
	}
	fs := flag.NewFlagSet("bench "+c.Scenario, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.URL, "url", "http://127.0.0.1:8080", "server base URL (loopback only)")
	fs.IntVar(&c.Users, "users", 1000, "simulated users (sessions)")
	fs.DurationVar(&c.Duration, "duration", 10*time.Second, "how long to send (or hold connections); at most 30m")
	fs.IntVar(&c.Rate, "rate", 0, "messages per second in total (0: flat out, --window in flight per sender)")
	fs.IntVar(&c.Window, "window", 8, "unacknowledged messages per sender when flat out")
	fs.IntVar(&c.Size, "size", 100, "message body bytes")
	fs.IntVar(&c.GroupSize, "group-size", 1000, "members per group (group); a group's members are all sessions of one worker process (--procs)")
	fs.IntVar(&c.Senders, "senders", 10, "senders per group (group)")
	fs.IntVar(&c.Backlog, "backlog", 1000, "pending messages (sync)")
	fs.IntVar(&c.Conversations, "conversations", 50, "senders of the backlog (sync)")
	fs.IntVar(&c.Procs, "procs", 1, "worker processes to spread sessions over (20,000 open files per process here)")
	fs.BoolVar(&c.JSON, "json", false, "print the result as JSON")
	fs.IntVar(&c.ServerPID, "server-pid", 0, "server process id, to report its memory and CPU from /proc")
	fs.StringVar(&c.MetricsURL, "server-metrics", "", "the server's metrics URL (serve --metrics-addr), to report its memory and CPU when --server-pid is not given, e.g. http://127.0.0.1:9090/metrics")
	fs.StringVar(&c.Prefix, "prefix", "", "username prefix (default: unique per run)")
	fs.IntVar(&c.Concurrency, "concurrency", 100, "parallel logins and connects")
	fs.StringVar(&c.Format, "format", "text", "WebSocket frames: text (JSON v2.1) or binary (protobuf, like the seed's v3 clients)")
	fs.StringVar(&c.DiskProbe, "disk-probe", os.TempDir(), "directory (on the server's data disk) where the load tool times a 4-KiB write+fsync every 10ms during the run, to show disk stalls beside the latencies; empty: off")
	fs.StringVar(&c.CPUProfile, "cpuprofile", "", "write the load tool's own CPU profile to this file (with --procs, one file per worker: FILE.N)")
	fs.IntVar(&c.workerIndex, "worker-index", 0, "internal: this worker's index")
	fs.IntVar(&c.workers, "workers", 0, "internal: number of workers (0: this is the parent)")
	if err := fs.Parse(args[1:]); err != nil {
		return nil, err
	}
	u, err := url.Parse(c.URL)
	if err != nil {
		return nil, fmt.Errorf("--url: %w", err)
	}
	if ip := net.ParseIP(u.Hostname()); u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("--url %s: the load tool only targets loopback addresses", c.URL)
	}
	if c.MetricsURL != "" {
		mu, err := url.Parse(c.MetricsURL)
		if err != nil {
			return nil, fmt.Errorf("--server-metrics: %w", err)
		}
		if ip := net.ParseIP(mu.Hostname()); mu.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return nil, fmt.Errorf("--server-metrics %s: the load tool only targets loopback addresses", c.MetricsURL)
		}
	}
	if c.Duration <= 0 || c.Duration > 30*time.Minute {
		return nil, errors.New("--duration must be between 0 and 30m")
	}
	if c.Users < 2 || c.Users > 200000 || c.Procs < 1 || c.Procs > 32 {
		return nil, errors.New("--users must be 2..200000 and --procs 1..32")
	}
	if c.Format != "text" && c.Format != "binary" {
		return nil, fmt.Errorf("--format: %q is neither text nor binary", c.Format)
	}
	if c.Prefix == "" {
		c.Prefix = "b" + strconv.FormatInt(time.Now().UnixMilli()%1e9, 36)
	}
	return c, nil
}

// bench runs `vartalap bench`.
func bench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c, err := parseBench(args, stderr)
	if err != nil {
		return err
	}
	if c.workers > 0 { // a worker: run our share, print JSON
		if c.CPUProfile != "" {
			stop, err := startCPUProfile(c.CPUProfile + "." + strconv.Itoa(c.workerIndex))
			if err != nil {
				return err
			}
			defer stop()
		}
		r, err := runScenario(ctx, c, stderr)
		if err != nil {
			return err
		}
		return json.NewEncoder(stdout).Encode(r)
	}
	before := c.serverRSS()
	calibration := calibrate()
	var probe *diskProbe
	if c.DiskProbe != "" {
		probe = startDiskProbe(c.DiskProbe)
		defer probe.finish() // stops it if the run fails
	}
	var res *benchResult
	if c.Procs == 1 {
		c.workers, c.workerIndex = 1, 0
		if c.CPUProfile != "" {
			stop, err := startCPUProfile(c.CPUProfile)
			if err != nil {
				return err
			}
			defer stop()
		}
		res, err = runScenario(ctx, c, stderr)
	} else {
		res, err = runWorkers(ctx, c, args, stderr)
	}
	if err != nil {
		return err
	}
	res.RSSBeforeKiB = before
	res.CalibrationNs = calibration
	if probe != nil {
		if h, err := probe.finish(); err != nil {
			fmt.Fprintln(stderr, "warning:", err)
		} else {
			res.DiskFsync = h
		}
	}
	if res.RSSAfterKiB == 0 {
		res.RSSAfterKiB = c.serverRSS()
	}
	if c.JSON {
		return json.NewEncoder(stdout).Encode(res)
	}
	printResult(stdout, res)
	return nil
}

// startCPUProfile profiles the load tool itself, to tell its cost from the
// server's when both share a machine.
func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

// runWorkers re-executes this binary as --procs workers and merges their results.
func runWorkers(ctx context.Context, c *benchConfig, args []string, stderr io.Writer) (*benchResult, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	res := newResult(c)
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, c.Procs)
	for i := range c.Procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wargs := append([]string{"bench"}, args...)
			wargs = append(wargs, "--prefix", c.Prefix, "--worker-index", strconv.Itoa(i), "--workers", strconv.Itoa(c.Procs))
			cmd := exec.CommandContext(ctx, self, wargs...)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, stderr
			if err := cmd.Run(); err != nil {
				errs <- fmt.Errorf("worker %d: %w", i, err)
				return
			}
			var r benchResult
			if err := json.Unmarshal(out.Bytes(), &r); err != nil {
				errs <- fmt.Errorf("worker %d output: %w", i, err)
				return
			}
			mu.Lock()
			res.merge(&r)
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	return res, nil
}

func runScenario(ctx context.Context, c *benchConfig, stderr io.Writer) (*benchResult, error) {
	b := &bencher{c: c, res: newResult(c), log: stderr, http: &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: c.Concurrency, MaxConnsPerHost: c.Concurrency},
	}}
	lo, hi := share(c.Users, c.workerIndex, c.workers)
	b.res.Users = hi - lo
	start := time.Now()
	var err error
	switch c.Scenario {
	case "connect":
		err = b.connect(ctx, lo, hi)
	case "direct":
		err = b.direct(ctx, lo, hi)
	case "group":
		err = b.group(ctx, lo, hi)
	case "sync":
		err = b.sync(ctx)
	case "reconnect":
		err = b.reconnect(ctx, lo, hi)
	}
	b.res.Seconds = time.Since(start).Seconds()
	return b.res, err
}

// share splits n users into equal even-sized ranges.
func share(n, i, of int) (lo, hi int) {
	per := n / of
	per -= per % 2
	lo = i * per
	hi = lo + per
	if i == of-1 {
		hi = n - n%2
	}
	return lo, hi
}

type bencher struct {
	c    *benchConfig
	res  *benchResult
	log  io.Writer
	http *http.Client
	mu   sync.Mutex
}

func (b *bencher) userName(i int) string { return fmt.Sprintf("%su%d", b.c.Prefix, i) }

func (b *bencher) fail(err error) {
	atomic.AddInt64(&b.res.Errors, 1)
	b.mu.Lock()
	if len(b.res.ErrorSamples) < 5 {
		b.res.ErrorSamples = append(b.res.ErrorSamples, err.Error())
	}
	b.mu.Unlock()
}

func (b *bencher) progress(format string, args ...any) {
	fmt.Fprintf(b.log, "[bench %d/%d] %s\n", b.c.workerIndex+1, max(b.c.workers, 1), fmt.Sprintf(format, args...))
}

// login logs a user in with the dev provider.
func (b *bencher) login(ctx context.Context, user string) (string, error) {
	body, _ := json.Marshal(map[string]string{"username": user, "authToken": "bench", "deviceId": "bench"})
	req, _ := http.NewRequestWithContext(ctx, "POST", b.c.URL+"/v1.0/login", bytes.NewReader(body))
	resp, err := b.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var lr loginAnswer
	if err := json.NewDecoder(resp.Body).Decode(&lr); err != nil || resp.StatusCode != 200 {
		return "", fmt.Errorf("login %s: status %d", user, resp.StatusCode)
	}
	return lr.AccessKey, nil
}

type loginAnswer struct {
	AccessKey string `json:"accesskey"`
}

// session is one simulated client socket.
type session struct {
	user, key string
	conn      *websocket.Conn
	raw       *ackConn
	wmu       sync.Mutex
	deadline  time.Time // the write deadline set last (under wmu)
	done      chan struct{}
	sentAt    sync.Map      // id → time.Time (SERVER_ACK latency)
	seen      idSet         // ids received, across reconnects
	acks      chan struct{} // one token per SERVER_ACK (flat-out window)
	closing   atomic.Bool
	binary    bool
}

// frameInfo is what the load tool reads from a server frame.
type frameInfo struct {
	id               string
	serverAck, error bool
	t                int64 // body.t: send time in ns, when present
	content          []byte
}

// jsonFrame is the part of a JSON v2.1 frame the load tool reads.
type jsonFrame struct {
	ID   string `json:"id"`
	Head struct {
		ContentType string `json:"contentType"`
		Action      string `json:"action"`
	} `json:"head"`
	Body json.RawMessage `json:"body"`
}

// decodeFrame reads a JSON text frame or a protobuf binary frame.
func decodeFrame(data []byte, binary bool) (frameInfo, error) {
	if binary {
		return scanProto(data)
	}
	var f jsonFrame
	if err := json.Unmarshal(data, &f); err != nil {
		return frameInfo{}, err
	}
	return frameInfo{id: f.ID, serverAck: f.Head.ContentType == "SERVER_ACK", error: f.Head.Action == "error",
		t: bodyTime(f.Body), content: data}, nil
}

// bodyTime reads the "t" field the load tool puts first in its bodies.
func bodyTime(body []byte) int64 {
	const key = `{"t":`
	if !bytes.HasPrefix(body, []byte(key)) {
		return 0
	}
	rest := body[len(key):]
	end := bytes.IndexAny(rest, ",}")
	if end < 0 {
		return 0
	}
	t, _ := strconv.ParseInt(string(rest[:end]), 10, 64)
	return t
}

// open connects s and starts its reader, which acks every delivered message.
func (b *bencher) open(ctx context.Context, s *session) error {
	h := http.Header{}
	h.Set("user", s.user)
	h.Set("accesskey", s.key)
	s.binary = b.c.Format == "binary"
	u := "ws" + strings.TrimPrefix(b.c.URL, "http") + "/wss/?format=" + b.c.Format + "&ack=true"
	var raw *ackConn
	// An 8 KiB read buffer takes a segment of coalesced frames (the
	// server's --ws-coalesce) in one read, so their acks leave in one
	// write: with 1 KiB, six frames took two reads and two ack writes.
	d := websocket.Dialer{HandshakeTimeout: 30 * time.Second, ReadBufferSize: 8 << 10, WriteBufferSize: 1024,
		NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			raw = &ackConn{Conn: c}
			return raw, nil
		}}
	conn, _, err := d.DialContext(ctx, u, h)
	if err != nil {
		return err
	}
	s.raw = raw
	s.conn, s.done = conn, make(chan struct{})
	go func() {
		// Latencies collect per socket and merge when it closes: one
		// lock per delivery, taken by a thousand readers, cost the load
		// tool more than the histogram itself.
		e2e, ackLat := newHist(), newHist()
		defer func() {
			b.mu.Lock()
			b.res.E2ELatency.merge(e2e)
			b.res.AckLatency.merge(ackLat)
			b.mu.Unlock()
			close(s.done)
		}()
		for {
			_, data, err := conn.ReadMessage()
			if err != nil {
				if !s.closing.Load() {
					atomic.AddInt64(&b.res.Drops, 1)
				}
				return
			}
			if len(data) == 4 && string(data) == "pong" {
				continue
			}
			f, err := decodeFrame(data, s.binary)
			if err != nil {
				b.fail(fmt.Errorf("bad frame: %v", err))
				continue
			}
			now := time.Now()
			switch {
			case f.serverAck:
				atomic.AddInt64(&b.res.ServerAcked, 1)
				if v, ok := s.sentAt.LoadAndDelete(f.id); ok {
					ackLat.add(now.Sub(v.(time.Time)))
				}
				if s.acks != nil {
					select {
					case s.acks <- struct{}{}:
					default:
					}
				}
			case f.error:
				b.fail(fmt.Errorf("error frame for %s: %s", f.id, f.content))
				s.ack(f.id)
			default:
				if !s.seen.add(f.id) {
					atomic.AddInt64(&b.res.Duplicates, 1)
				} else {
					atomic.AddInt64(&b.res.Delivered, 1)
					if f.t > 0 {
						e2e.add(now.Sub(time.Unix(0, f.t)))
					}
				}
				s.ack(f.id)
			}
		}
	}()
	return nil
}

func (s *session) write(data []byte) error { return s.writeFrame(data, false) }

// writeFrame writes one frame; a deferred one (an ack) goes out with the
// next send or before the reader next waits for the network.
func (s *session) writeFrame(data []byte, deferred bool) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if deferred {
		s.raw.deferring(true)
		defer s.raw.deferring(false)
	}
	// A write stuck for 5–10 s fails; re-arming the deadline on every
	// frame cost a timer update per ack.
	if now := time.Now(); s.deadline.Sub(now) < 5*time.Second {
		s.deadline = now.Add(10 * time.Second)
		_ = s.conn.SetWriteDeadline(s.deadline)
	}
	kind := websocket.TextMessage
	if s.binary {
		kind = websocket.BinaryMessage
	}
	return s.conn.WriteMessage(kind, data)
}

func (s *session) ack(id string) {
	if s.binary {
		m := schema.Message{Version: 3, ID: id, Type: schema.TypeClientAck, Channel: schema.ChannelIndividual, Ephemeral: true, Destination: schema.ServerSource}
		_ = s.writeFrame(m.MarshalProto(), true)
		return
	}
	_ = s.writeFrame([]byte(`{"_v":2.1,"id":`+strconv.Quote(id)+`,"head":{"type":"INDIVIDUAL","to":"server","contentType":"CLIENT_ACK"},"body":{}}`), true)
}

func (s *session) close() {
	if s.conn == nil {
		return
	}
	s.closing.Store(true)
	_ = s.conn.Close()
	<-s.done
}

// send sends one message and records its send time.
func (b *bencher) send(s *session, id, to, channel string) error {
	now := time.Now()
	s.sentAt.Store(id, now)
	pad := strings.Repeat("x", max(b.c.Size-30, 0))
	body := `{"t":` + strconv.FormatInt(now.UnixNano(), 10) + `,"text":"` + pad + `"}`
	var frame []byte
	if s.binary {
		ch := schema.ChannelIndividual
		if channel == "GROUP" {
			ch = schema.ChannelGroup
		}
		m := schema.Message{Version: 3, ID: id, Type: schema.TypeMessage, Channel: ch, Destination: to, Content: []byte(body)}
		frame = m.MarshalProto()
	} else {
		frame = []byte(`{"_v":2.1,"id":` + strconv.Quote(id) + `,"head":{"type":"` + channel + `","to":` + strconv.Quote(to) +
			`,"contentType":"text","action":"message"},"body":` + body + `}`)
	}
	if err := s.write(frame); err != nil {
		s.sentAt.Delete(id)
		return err
	}
	atomic.AddInt64(&b.res.Sent, 1)
	return nil
}

// sessions logs in and connects users [lo, hi) with bounded concurrency.
func (b *bencher) sessions(ctx context.Context, lo, hi int) []*session {
	out := make([]*session, hi-lo)
	sem := make(chan struct{}, b.c.Concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	var done atomic.Int64
	for i := lo; i < hi; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s := &session{user: b.userName(i)}
			var err error
			if s.key, err = b.login(ctx, s.user); err == nil {
				err = b.open(ctx, s)
			}
			if err != nil {
				atomic.AddInt64(&b.res.ConnectFailed, 1)
				b.fail(err)
				return
			}
			atomic.AddInt64(&b.res.Connected, 1)
			out[i-lo] = s
			if n := done.Add(1); n%1000 == 0 {
				b.progress("%d sessions connected", n)
			}
		}()
	}
	wg.Wait()
	b.res.ConnectSeconds = time.Since(start).Seconds()
	b.progress("%d connected, %d failed in %.1fs", b.res.Connected, b.res.ConnectFailed, b.res.ConnectSeconds)
	return out
}

func closeAll(ss []*session) {
	for _, s := range ss {
		if s != nil {
			s.close()
		}
	}
}

func (b *bencher) connect(ctx context.Context, lo, hi int) error {
	ss := b.sessions(ctx, lo, hi)
	defer closeAll(ss)
	deadline := time.After(b.c.Duration)
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline:
			b.res.RSSAfterKiB = b.c.serverRSS() // while every session is still open
			return nil
		case <-tick.C:
			b.progress("holding %d sessions, %d drops", b.res.Connected, atomic.LoadInt64(&b.res.Drops))
		}
	}
}

// pump sends from s to `to` until stop, at rate per second (0: window in flight).
func (b *bencher) pump(ctx context.Context, s *session, to, channel string, perSec float64, stop <-chan struct{}) {
	n := 0
	next := func() bool {
		if err := b.send(s, fmt.Sprintf("%s-%d", s.user, n), to, channel); err != nil {
			b.fail(err)
			return false
		}
		n++
		return true
	}
	var tick <-chan time.Time
	if perSec > 0 {
		t := phasedTicker(ctx, time.Duration(float64(time.Second)/perSec), stop)
		if t == nil {
			return
		}
		defer t.Stop()
		tick = t.C
		if !next() {
			return
		}
	} else {
		s.acks = make(chan struct{}, b.c.Window)
		for range b.c.Window {
			s.acks <- struct{}{}
		}
	}
	for {
		var silent <-chan time.Time
		if perSec == 0 {
			silent = time.After(10 * time.Second)
		}
		select {
		case <-stop:
			return
		case <-ctx.Done():
			return
		case <-tick:
			if !next() {
				return
			}
		case <-s.acks:
			if !next() {
				return
			}
		case <-silent:
			b.fail(fmt.Errorf("%s: no SERVER_ACK for 10s", s.user))
			return
		}
	}
}

// phasedTicker waits a random part of period, then returns a ticker of
// period: senders started together do not tick together. (A ticker made
// before the wait kept its phase, and every sender of a group sent in the
// same instant.) Nil when stop or ctx ends first.
func phasedTicker(ctx context.Context, period time.Duration, stop <-chan struct{}) *time.Ticker {
	t := time.NewTimer(rand.N(period))
	defer t.Stop()
	select {
	case <-t.C:
		return time.NewTicker(period)
	case <-stop:
	case <-ctx.Done():
	}
	return nil
}

// drain waits until every server-acked message is delivered (or 15s pass)
// and records the difference as undelivered: under overload that is a
// backlog still queued in the server, not a loss (the crash test counts
// losses).
func (b *bencher) drain(expectPerAck int64) {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		acked := atomic.LoadInt64(&b.res.ServerAcked)
		if acked+atomic.LoadInt64(&b.res.Errors) >= atomic.LoadInt64(&b.res.Sent) &&
			atomic.LoadInt64(&b.res.Delivered) >= acked*expectPerAck {
			return // every send answered, every acked message received
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.res.Undelivered = atomic.LoadInt64(&b.res.ServerAcked)*expectPerAck - atomic.LoadInt64(&b.res.Delivered)
}

func (b *bencher) direct(ctx context.Context, lo, hi int) error {
	ss := b.sessions(ctx, lo, hi)
	defer closeAll(ss)
	rand.Shuffle(len(ss), func(i, j int) { ss[i], ss[j] = ss[j], ss[i] })
	stop := make(chan struct{})
	var wg sync.WaitGroup
	pairs := len(ss) / 2
	perSec := 0.0
	if b.c.Rate > 0 {
		perSec = float64(b.c.Rate) / float64(max(b.c.workers, 1)) / float64(pairs)
	}
	for p := range pairs {
		from, to := ss[2*p], ss[2*p+1]
		if from == nil || to == nil {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); b.pump(ctx, from, to.user, "INDIVIDUAL", perSec, stop) }()
	}
	b.report(ctx, stop)
	wg.Wait()
	b.drain(1)
	return nil
}

// report prints progress every second until --duration ends, then closes stop.
func (b *bencher) report(ctx context.Context, stop chan struct{}) {
	start := time.Now()
	end := time.After(b.c.Duration)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var last int64
	tool0, server0 := selfCPUSeconds(), b.c.serverCPU()
	finish := func() {
		b.res.SendSeconds = time.Since(start).Seconds()
		b.res.DeliveredSending = atomic.LoadInt64(&b.res.Delivered)
		if tool1 := selfCPUSeconds(); tool0 >= 0 && tool1 >= 0 {
			b.res.ToolCPUSeconds = tool1 - tool0
		}
		if server1 := b.c.serverCPU(); server0 >= 0 && server1 >= 0 {
			b.res.ServerCPUSeconds = server1 - server0
		}
		close(stop)
	}
	for {
		select {
		case <-ctx.Done():
			finish()
			return
		case <-end:
			finish()
			return
		case <-t.C:
			d := atomic.LoadInt64(&b.res.Delivered)
			b.progress("sent %d, acked %d, delivered %d (%d/s)", atomic.LoadInt64(&b.res.Sent), atomic.LoadInt64(&b.res.ServerAcked), d, d-last)
			last = d
		}
	}
}

func (b *bencher) group(ctx context.Context, lo, hi int) error {
	all := b.sessions(ctx, lo, hi)
	defer closeAll(all)
	// Groups are made of the sessions that connected (failed ones are nil).
	ss := slices.DeleteFunc(slices.Clone(all), func(s *session) bool { return s == nil })
	if len(ss) < 2 {
		return fmt.Errorf("group: %d of %d sessions connected; a group needs two", len(ss), hi-lo)
	}
	g := min(b.c.GroupSize, len(ss))
	if g < b.c.GroupSize {
		b.progress("warning: groups of %d members, not %d: this worker holds %d sessions (a group's members are all in one worker; raise --users or lower --procs)",
			g, b.c.GroupSize, len(ss))
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	type plan struct {
		senders []*session
		gid     string
	}
	var plans []plan
	for start := 0; start+g <= len(ss); start += g {
		members := ss[start : start+g]
		names := make([]string, 0, g)
		for _, m := range members {
			names = append(names, m.user)
		}
		gid, err := b.createGroup(ctx, members[0], names)
		if err != nil {
			return err
		}
		plans = append(plans, plan{senders: members[:min(b.c.Senders, len(members))], gid: gid})
	}
	b.res.Groups, b.res.GroupMembers = len(plans), g
	time.Sleep(time.Second) // let the group-creation events arrive before counting
	atomic.StoreInt64(&b.res.Delivered, 0)
	for _, p := range plans {
		perSec := 0.0
		if b.c.Rate > 0 {
			perSec = float64(b.c.Rate) / float64(max(b.c.workers, 1)) / float64(len(p.senders)) / float64(len(plans))
		}
		for _, s := range p.senders {
			wg.Add(1)
			go func() { defer wg.Done(); b.pump(ctx, s, p.gid, "GROUP", perSec, stop) }()
		}
	}
	b.report(ctx, stop)
	wg.Wait()
	b.drain(int64(g - 1))
	return nil
}

func (b *bencher) createGroup(ctx context.Context, owner *session, members []string) (string, error) {
	// The API takes at most 256 usernames per request: create with the
	// first ones, then add the rest in chunks.
	const chunk = 256
	first := members[:min(chunk-1, len(members))]
	var gr struct {
		GroupID string `json:"groupId"`
	}
	if err := b.groupCall(ctx, owner, "POST", "/v1.0/groups/", map[string]any{"name": "bench", "members": first}, &gr); err != nil {
		return "", err
	}
	if gr.GroupID == "" {
		return "", errors.New("create group: no groupId")
	}
	for rest := members[len(first):]; len(rest) > 0; {
		n := min(chunk, len(rest))
		if err := b.groupCall(ctx, owner, "POST", "/v1.0/groups/"+gr.GroupID+"/members", map[string]any{"members": rest[:n]}, nil); err != nil {
			return "", err
		}
		rest = rest[n:]
	}
	return gr.GroupID, nil
}

func (b *bencher) groupCall(ctx context.Context, s *session, method, path string, body, out any) error {
	data, _ := json.Marshal(body)
	req, _ := http.NewRequestWithContext(ctx, method, b.c.URL+path, bytes.NewReader(data))
	req.Header.Set("user", s.user)
	req.Header.Set("accesskey", s.key)
	resp, err := b.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s %s: status %d: %s", method, path, resp.StatusCode, msg)
	}
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}

// restSend posts messages (JSON strings) as `from` in batches of 100.
func (b *bencher) restSend(ctx context.Context, from *session, msgs []string) error {
	for len(msgs) > 0 {
		n := min(100, len(msgs))
		body, _ := json.Marshal(msgs[:n])
		req, _ := http.NewRequestWithContext(ctx, "POST", b.c.URL+"/v1.0/messages?ack=true", bytes.NewReader(body))
		req.Header.Set("user", from.user)
		req.Header.Set("accesskey", from.key)
		resp, err := b.http.Do(req)
		if err != nil {
			return err
		}
		var ar struct {
			Acks []string `json:"acks"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&ar)
		resp.Body.Close()
		if resp.StatusCode != 201 {
			return fmt.Errorf("POST /messages: status %d", resp.StatusCode)
		}
		atomic.AddInt64(&b.res.Sent, int64(n))
		atomic.AddInt64(&b.res.ServerAcked, int64(len(ar.Acks)))
		msgs = msgs[n:]
	}
	return nil
}

func restMsg(id, to string) string {
	return `{"_v":2.1,"id":` + strconv.Quote(id) + `,"head":{"type":"INDIVIDUAL","to":` + strconv.Quote(to) + `,"contentType":"text"},"body":{"text":"backlog"}}`
}

// waitDelivered waits until n messages were delivered or timeout passes.
func (b *bencher) waitDelivered(n int64, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for atomic.LoadInt64(&b.res.Delivered) < n {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

func (b *bencher) sync(ctx context.Context) error {
	target := &session{user: b.userName(0)}
	var err error
	if target.key, err = b.login(ctx, target.user); err != nil {
		return err
	}
	per := max(b.c.Backlog/max(b.c.Conversations, 1), 1)
	for c := range b.c.Conversations {
		from := &session{user: b.userName(c + 1)}
		if from.key, err = b.login(ctx, from.user); err != nil {
			return err
		}
		msgs := make([]string, per)
		for i := range msgs {
			msgs[i] = restMsg(fmt.Sprintf("%s-%d", from.user, i), target.user)
		}
		if err := b.restSend(ctx, from, msgs); err != nil {
			return err
		}
	}
	b.progress("backlog of %d sent; letting the router store it", b.res.ServerAcked)
	time.Sleep(2 * time.Second)
	start := time.Now()
	if err := b.open(ctx, target); err != nil {
		return err
	}
	defer target.close()
	if !b.waitDelivered(b.res.ServerAcked, 60*time.Second) {
		b.res.Undelivered = b.res.ServerAcked - atomic.LoadInt64(&b.res.Delivered)
	}
	b.res.CatchUpSeconds = time.Since(start).Seconds()
	return nil
}

func (b *bencher) reconnect(ctx context.Context, lo, hi int) error {
	ss := b.sessions(ctx, lo, hi)
	defer closeAll(ss)
	src := &session{user: b.userName(hi) + "src"}
	var err error
	if src.key, err = b.login(ctx, src.user); err != nil {
		return err
	}
	b.progress("dropping %d sessions at once", len(ss))
	for _, s := range ss {
		if s != nil {
			s.close()
			s.closing.Store(false)
		}
	}
	var msgs []string
	for _, s := range ss {
		if s != nil {
			msgs = append(msgs, restMsg(s.user+"-pending", s.user))
		}
	}
	if err := b.restSend(ctx, src, msgs); err != nil {
		return err
	}
	time.Sleep(time.Second)
	start := time.Now()
	sem := make(chan struct{}, b.c.Concurrency)
	var wg sync.WaitGroup
	for _, s := range ss {
		if s == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := b.open(ctx, s); err != nil {
				b.fail(err)
			}
		}()
	}
	wg.Wait()
	if !b.waitDelivered(int64(len(msgs)), 60*time.Second) {
		b.res.Undelivered = int64(len(msgs)) - atomic.LoadInt64(&b.res.Delivered)
	}
	b.res.CatchUpSeconds = time.Since(start).Seconds()
	return nil
}

// rssKiB reads VmRSS of pid from /proc (0 when unknown).
// serverRSS is the server's resident memory in KiB: from /proc with
// --server-pid, else from process_resident_memory_bytes at
// --server-metrics; 0 when neither is given or readable.
func (c *benchConfig) serverRSS() int64 {
	if c.ServerPID > 0 {
		return rssKiB(c.ServerPID)
	}
	if c.MetricsURL != "" {
		return metricsRSSKiB(c.MetricsURL)
	}
	return 0
}

// metricsRSSKiB reads process_resident_memory_bytes from a Prometheus text
// exposition at u.
func metricsRSSKiB(u string) int64 {
	v, ok := metricsValue(u, "process_resident_memory_bytes")
	if !ok {
		return 0
	}
	return int64(v) / 1024
}

// metricsValue reads the unlabelled sample name from a Prometheus text
// exposition at u.
func metricsValue(u, name string) (float64, bool) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(u)
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		return 0, false
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f, err == nil
		}
	}
	return 0, false
}

func rssKiB(pid int) int64 {
	if pid <= 0 {
		return 0
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				n, _ := strconv.ParseInt(f[1], 10, 64)
				return n
			}
		}
	}
	return 0
}

func printResult(w io.Writer, r *benchResult) {
	fmt.Fprintf(w, "scenario            %s\n", r.Scenario)
	fmt.Fprintf(w, "users               %d\n", r.Users)
	fmt.Fprintf(w, "connected           %d (failed %d) in %.2fs (%.0f/s)\n", r.Connected, r.ConnectFailed, r.ConnectSeconds, float64(r.Connected)/max(r.ConnectSeconds, 1e-9))
	fmt.Fprintf(w, "drops               %d\n", r.Drops)
	if r.Groups > 0 {
		fmt.Fprintf(w, "groups              %d of %d members\n", r.Groups, r.GroupMembers)
	}
	if r.Sent > 0 {
		fmt.Fprintf(w, "sent / server-acked %d / %d\n", r.Sent, r.ServerAcked)
		fmt.Fprintf(w, "delivered           %d (%.0f/s over %.1fs), duplicates %d, undelivered after a 15s drain %d\n", r.Delivered, float64(r.Delivered)/max(r.Seconds, 1e-9), r.Seconds, r.Duplicates, r.Undelivered)
		if r.SendSeconds > 0 {
			fmt.Fprintf(w, "while sending       %d delivered in %.1fs (%.0f/s)\n", r.DeliveredSending, r.SendSeconds, float64(r.DeliveredSending)/r.SendSeconds)
			if r.ToolCPUSeconds > 0 || r.ServerCPUSeconds > 0 {
				fmt.Fprintf(w, "CPU while sending   %s server, %.2f cores load tool\n", cores(r.ServerCPUSeconds, r.SendSeconds), r.ToolCPUSeconds/r.SendSeconds)
			}
		}
	}
	for _, l := range []struct {
		name string
		h    *hist
	}{{"SERVER_ACK latency", r.AckLatency}, {"end-to-end latency", r.E2ELatency}} {
		if l.h.N == 0 {
			continue
		}
		fmt.Fprintf(w, "%-19s p50 %v  p90 %v  p99 %v  p99.9 %v  max %v  (n=%d)\n", l.name,
			l.h.quantile(.5).Round(time.Microsecond), l.h.quantile(.9).Round(time.Microsecond), l.h.quantile(.99).Round(time.Microsecond),
			l.h.quantile(.999).Round(time.Microsecond), l.h.Max.Round(time.Microsecond), l.h.N)
	}
	if r.CatchUpSeconds > 0 {
		fmt.Fprintf(w, "caught up in        %.3fs\n", r.CatchUpSeconds)
	}
	if r.RSSAfterKiB > 0 {
		fmt.Fprintf(w, "server RSS          %d KiB before, %d KiB after", r.RSSBeforeKiB, r.RSSAfterKiB)
		if r.Connected > 0 {
			fmt.Fprintf(w, " (%.1f KiB per session)", float64(r.RSSAfterKiB-r.RSSBeforeKiB)/float64(r.Connected))
		}
		fmt.Fprintln(w)
	}
	if r.CalibrationNs > 0 {
		fmt.Fprintf(w, "machine speed       %.2f µs to decode a chat frame (schema.DecodeJSON, just before the run)\n", r.CalibrationNs/1000)
	}
	if h := r.DiskFsync; h != nil && h.N > 0 {
		fmt.Fprintf(w, "disk during the run 4-KiB write+fsync p50 %v  p99 %v  max %v, %d of %d over %v (stalls)\n",
			h.quantile(.5).Round(time.Microsecond), h.quantile(.99).Round(time.Microsecond), h.Max.Round(time.Microsecond), h.slowCount(slowFsync), h.N, slowFsync)
	}
	fmt.Fprintf(w, "errors              %d %v\n", r.Errors, r.ErrorSamples)
}

// cores renders CPU seconds over a wall time as cores, or says the
// server's CPU is unknown.
func cores(cpu, wall float64) string {
	if cpu <= 0 {
		return "? cores (give --server-pid or --server-metrics)"
	}
	return fmt.Sprintf("%.2f cores", cpu/wall)
}
