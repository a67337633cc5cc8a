package gateway

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"net/http"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/gorilla/websocket"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// Sink is one connection as the delivery service sees it.
type Sink interface {
	// Deliver renders m for the connection's format and enqueues it without
	// blocking. It returns false when the outbound queue is full (a slow
	// consumer) or the connection is gone.
	Deliver(m *schema.Message) bool
	// Close closes the socket with this WebSocket close code and reason. It
	// never blocks and is idempotent: only the first call counts.
	Close(code int, reason string)
	// Flush sends what is queued without holding it for Config.WriteCoalesce:
	// called after messages read from a stream (a catch-up), whose next
	// ones come only when the device acks these. It never blocks.
	Flush()
}

// Session is the delivery session of one connection.
type Session interface {
	// Ack reports CLIENT_ACKs (message ids) received on the connection.
	Ack(ids ...string)
	// Close ends the session; called once when the connection ends.
	Close()
}

// Deliverer opens delivery sessions and records acks sent without a socket.
type Deliverer interface {
	Open(ctx context.Context, user schema.UserID, device schema.DeviceID, sink Sink) (Session, error)
	AckByID(ctx context.Context, user schema.UserID, device schema.DeviceID, ids []string) error
}

// Overloader is implemented by a Deliverer that can tell when it falls
// behind its live messages. While it does, group messages pass a gate that
// admits them at the rate the node keeps up with (see fanoutGate): a
// fan-out is a thousand deliveries per message, and a node that accepts
// group messages faster than it delivers them builds a backlog that only
// grows. A message waits for its turn up to Config.FanoutPause (its
// sender's socket is not read meanwhile, so the client slows down the way
// TCP would slow it) and is refused with rate_limited beyond that.
// One-to-one messages do not wait.
type Overloader interface {
	Overloaded() bool
}

// Config configures a Gateway.
type Config struct {
	// JS publishes accepted messages to CHAT_IN. Required.
	JS jetstream.JetStream
	// NC publishes ephemeral messages (core NATS). Default: JS.Conn().
	NC *nats.Conn
	// Logger receives connection and error logs. Default: discard.
	Logger *slog.Logger
	// Auth checks `user` + `accesskey`. Required.
	Auth api.Authenticator
	// Delivery opens a delivery session per socket and takes REST acks. Required.
	Delivery Deliverer
	// Ready reports readiness for GET /readyz. Default: always ready.
	Ready func(ctx context.Context) error
	// Static is the web client served for GET "/" and unknown GET paths
	// that exist in it. Default: none.
	Static fs.FS

	// MaxFrameBytes is the largest accepted message frame (and REST entry).
	// Default 64 KiB. Larger frames up to max(4×MaxFrameBytes, 1 MiB) get a
	// too_large error frame; beyond that the socket is closed with 1009.
	MaxFrameBytes int
	// OutboundQueue is the number of frames buffered per socket before it
	// counts as a slow consumer. It must exceed the Deliverer's window of
	// unacked messages per device by a write batch (128 frames; see
	// maxWriteBatch), or a client that acks while a batch is being written
	// can be taken for a slow one. Default 512 (delivery's window: 256).
	OutboundQueue int
	// PingInterval is how often the server pings each socket. The read
	// deadline is 2.5×PingInterval after the last frame or pong. Default 30s.
	PingInterval time.Duration
	// WriteTimeout bounds the write of one frame. Default 10s.
	WriteTimeout time.Duration
	// WriteCoalesce is how long frames to a busy socket wait for more to
	// share their write. A socket is busy when its frames have lately come
	// less than this apart (over 25 a second at the default) and it was
	// written less than this ago: a member of a busy group then gets
	// several frames per system call (and answers them with one read's
	// acks) instead of one each. Frames to other sockets, 8 or more queued
	// frames, frames followed by Sink.Flush (a catch-up) and answers to the
	// client (SERVER_ACK, error notice, pong) go out at once. Default 40ms;
	// negative: every frame is written as soon as possible.
	WriteCoalesce time.Duration
	// PublishTimeout bounds the wait for a JetStream PubAck. Default 5s.
	PublishTimeout time.Duration
	// RatePerSecond is the sustained messages per second per connection,
	// with a burst of twice that (at least 1). CLIENT_ACKs and pings are not
	// counted. Default 50 (burst 100).
	RatePerSecond float64
	// AllowedOrigins are extra Origin header values (exact, case-insensitive,
	// e.g. "https://app.example.com") allowed for browser upgrades. A request
	// without Origin (native clients) or from the same host is always allowed.
	AllowedOrigins []string
	// MaxRESTMessages is the largest number of entries in one POST /messages.
	// Default 100.
	MaxRESTMessages int
	// Node names this gateway in the subject of its CHAT_IN batches
	// (schema.ChatInBatch): 1 to 64 of [A-Za-z0-9_-]. Default "gateway".
	Node string
	// FanoutPause is the longest a group message waits for its turn
	// while the Deliverer falls behind (see Overloader); one that would
	// wait longer is refused with rate_limited. Default 5s.
	FanoutPause time.Duration
	// Metrics registers the gateway's Prometheus collectors
	// (vartalap_gateway_*). Default nil: they count but are not registered.
	// New fails if they cannot be registered (e.g. a second gateway on the
	// same registry).
	Metrics prometheus.Registerer
}

// Defaults.
const (
	DefaultMaxFrameBytes   = 64 << 10
	DefaultOutboundQueue   = 512
	DefaultPingInterval    = 30 * time.Second
	DefaultWriteTimeout    = 10 * time.Second
	DefaultWriteCoalesce   = 40 * time.Millisecond
	DefaultPublishTimeout  = 5 * time.Second
	DefaultRatePerSecond   = 50
	DefaultMaxRESTMessages = 100
	DefaultFanoutPause     = 5 * time.Second
)

// readBufferSize is the per-socket read buffer. Small, because every idle
// socket holds it; larger frames are read through it in pieces.
const readBufferSize = 1024

// errShuttingDown refuses new sockets once Shutdown started (the client
// gets 503).
var errShuttingDown = errors.New("gateway shutting down")

// Gateway is the WebSocket and HTTP edge for messaging.
type Gateway struct {
	cfg       Config
	log       *slog.Logger
	nc        *nats.Conn
	upgrader  websocket.Upgrader
	hardLimit int64
	burst     int
	origins   []string
	commit    *committer  // group commit of CHAT_IN publishes
	fanout    *fanoutGate // nil unless the Deliverer is an Overloader
	// The last message rendered per format (see conn.render).
	lastProto, lastJSON atomic.Pointer[rendered]
	metrics             *metrics

	// ctx is the context of the socket goroutines (they outlive their HTTP
	// requests); Shutdown cancels it.
	ctx    context.Context
	cancel context.CancelFunc

	connSeq atomic.Uint64

	mu       sync.Mutex
	conns    map[*conn]struct{}
	shutdown bool
	wg       sync.WaitGroup
}

// New validates cfg, fills defaults and returns a Gateway.
func New(cfg Config) (*Gateway, error) {
	if cfg.JS == nil {
		return nil, errors.New("gateway: config: JS is required")
	}
	if cfg.Auth == nil {
		return nil, errors.New("gateway: config: Auth is required")
	}
	if cfg.Delivery == nil {
		return nil, errors.New("gateway: config: Delivery is required")
	}
	if cfg.NC == nil {
		cfg.NC = cfg.JS.Conn()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxFrameBytes < 0 || cfg.OutboundQueue < 0 || cfg.PingInterval < 0 || cfg.WriteTimeout < 0 ||
		cfg.PublishTimeout < 0 || cfg.RatePerSecond < 0 || cfg.MaxRESTMessages < 0 || cfg.FanoutPause < 0 {
		return nil, errors.New("gateway: config: negative limit")
	}
	if cfg.MaxFrameBytes == 0 {
		cfg.MaxFrameBytes = DefaultMaxFrameBytes
	}
	if cfg.OutboundQueue == 0 {
		cfg.OutboundQueue = DefaultOutboundQueue
	}
	if cfg.PingInterval == 0 {
		cfg.PingInterval = DefaultPingInterval
	}
	if cfg.WriteCoalesce == 0 {
		cfg.WriteCoalesce = DefaultWriteCoalesce
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	if cfg.PublishTimeout == 0 {
		cfg.PublishTimeout = DefaultPublishTimeout
	}
	if cfg.RatePerSecond == 0 {
		cfg.RatePerSecond = DefaultRatePerSecond
	}
	if cfg.MaxRESTMessages == 0 {
		cfg.MaxRESTMessages = DefaultMaxRESTMessages
	}
	if cfg.FanoutPause == 0 {
		cfg.FanoutPause = DefaultFanoutPause
	}
	if cfg.Node == "" {
		cfg.Node = "gateway"
	}
	if !schema.ValidNode(cfg.Node) {
		return nil, fmt.Errorf("gateway: config: node %q is not 1 to 64 of [A-Za-z0-9_-]", cfg.Node)
	}
	m, err := newMetrics(cfg.Metrics)
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	g := &Gateway{
		cfg:       cfg,
		log:       cfg.Logger,
		nc:        cfg.NC,
		hardLimit: max(4*int64(cfg.MaxFrameBytes), 1<<20),
		burst:     max(1, int(math.Ceil(2*cfg.RatePerSecond))),
		conns:     make(map[*conn]struct{}),
		commit:    newCommitter(cfg.JS, cfg.Logger, cfg.PublishTimeout, cfg.Node, m),
		metrics:   m,
	}
	if o, ok := cfg.Delivery.(Overloader); ok {
		g.fanout = newFanoutGate(o.Overloaded, cfg.FanoutPause, m)
	}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	for _, o := range cfg.AllowedOrigins {
		g.origins = append(g.origins, strings.ToLower(strings.TrimRight(o, "/")))
	}
	g.upgrader = websocket.Upgrader{
		HandshakeTimeout: cfg.WriteTimeout,
		// An idle socket holds only its read buffer: write buffers come
		// from the pool for the duration of one message.
		ReadBufferSize:    readBufferSize,
		WriteBufferSize:   4096,
		WriteBufferPool:   &sync.Pool{},
		CheckOrigin:       g.checkOrigin,
		EnableCompression: false,
		Error: func(w http.ResponseWriter, _ *http.Request, status int, reason error) {
			api.WriteError(w, status, api.CodeBadRequest, "websocket upgrade required")
		},
	}
	return g, nil
}

// Routes registers the gateway's routes on r (paths without "/v1.0"; the
// root router adds api.StripVersion):
//
//	GET  /wss, /wss/   WebSocket
//	POST /messages     REST send (authenticated)
//	GET  /alive        200 "OK" (seed liveness)
//	GET  /healthz      200 {"status":"ok"}
//	GET  /readyz       200 {"status":"ready"} or 503
//	GET  /, /*         the static web client, when Config.Static is set
func (g *Gateway) Routes(r chi.Router) {
	r.Get("/wss", g.serveWS)
	r.Get("/wss/", g.serveWS)
	r.With(api.RequireAuth(g.cfg.Auth, g.log)).Post("/messages", g.serveMessages)
	r.Get("/alive", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("OK"))
	})
	r.Get("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		api.WriteJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	r.Get("/readyz", g.serveReady)
	if g.cfg.Static != nil {
		files := http.FileServerFS(g.cfg.Static)
		r.Get("/", files.ServeHTTP)
		r.Get("/*", func(w http.ResponseWriter, r *http.Request) {
			name := strings.TrimPrefix(path.Clean(r.URL.Path), "/")
			if name == "" {
				name = "."
			}
			if _, err := fs.Stat(g.cfg.Static, name); err != nil {
				api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "not found")
				return
			}
			files.ServeHTTP(w, r)
		})
	}
}

func (g *Gateway) serveReady(w http.ResponseWriter, r *http.Request) {
	if g.cfg.Ready != nil {
		if err := g.cfg.Ready(r.Context()); err != nil {
			g.log.Warn("not ready", "err", err)
			api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "not ready")
			return
		}
	}
	g.mu.Lock()
	down := g.shutdown
	g.mu.Unlock()
	if down {
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "shutting down")
		return
	}
	api.WriteJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

// Conns returns the number of open WebSocket connections.
func (g *Gateway) Conns() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.conns)
}

// Shutdown refuses new sockets, closes every open socket with 1001 "going
// away" and waits until their loops have ended (and their delivery sessions
// are closed), or until ctx ends.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	g.shutdown = true
	conns := make([]*conn, 0, len(g.conns))
	for c := range g.conns {
		conns = append(conns, c)
	}
	g.mu.Unlock()
	for _, c := range conns {
		c.Close(websocket.CloseGoingAway, "going away")
	}
	done := make(chan struct{})
	go func() {
		g.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		g.cancel()
		g.commit.close()
		return nil
	case <-ctx.Done():
		// Abort what the remaining sockets wait for (publishes, session
		// opens). The waiter goroutine ends once their loops end; their
		// read deadlines bound that.
		g.cancel()
		return fmt.Errorf("gateway shutdown: %w", ctx.Err())
	}
}

// register adds c to the open connections; it fails once Shutdown started.
func (g *Gateway) register(c *conn) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.shutdown {
		return errShuttingDown
	}
	g.conns[c] = struct{}{}
	g.wg.Add(1)
	return nil
}

func (g *Gateway) unregister(c *conn) {
	g.mu.Lock()
	delete(g.conns, c)
	g.mu.Unlock()
	g.wg.Done()
}

// checkOrigin allows requests without Origin (native clients), from the
// request's own host, or from an allowed origin. Never a wildcard.
func (g *Gateway) checkOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	o := strings.ToLower(strings.TrimRight(origin, "/"))
	if host, ok := strings.CutPrefix(o, "http://"); ok && host == strings.ToLower(r.Host) {
		return true
	}
	if host, ok := strings.CutPrefix(o, "https://"); ok && host == strings.ToLower(r.Host) {
		return true
	}
	for _, a := range g.origins {
		if o == a {
			return true
		}
	}
	return false
}

// authenticate resolves the request's credentials. On failure it has
// written the error response and returns false.
func (g *Gateway) authenticate(w http.ResponseWriter, r *http.Request) (api.Identity, bool) {
	user, key := api.Credentials(r)
	if user == "" || key == "" {
		g.log.Info("auth failed", "reason", "missing credentials", "path", r.URL.Path, "remote", r.RemoteAddr)
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "missing user or accesskey")
		return api.Identity{}, false
	}
	id, err := g.cfg.Auth.Authenticate(r.Context(), user, key)
	if errors.Is(err, api.ErrUnauthenticated) {
		g.log.Info("auth failed", "reason", "bad credentials", "user", user, "path", r.URL.Path, "remote", r.RemoteAddr)
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "invalid user or accesskey")
		return api.Identity{}, false
	}
	if err != nil {
		g.log.Error("auth error", "user", user, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "authentication unavailable")
		return api.Identity{}, false
	}
	return g.checkIdentity(w, id)
}

// checkIdentity makes sure an authenticated identity can be used in
// subjects and headers; an empty device becomes schema.DefaultDevice.
func (g *Gateway) checkIdentity(w http.ResponseWriter, id api.Identity) (api.Identity, bool) {
	if id.Device == "" {
		id.Device = schema.DefaultDevice
	}
	if !id.User.Valid() || !id.Device.Valid() {
		g.log.Error("authenticator returned an unusable identity", "user_valid", id.User.Valid(), "device_valid", id.Device.Valid())
		api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthenticated, "identity not usable")
		return api.Identity{}, false
	}
	return id, true
}

// newServerID returns a new unique server message id: 16 random bytes,
// base64url without padding (22 characters, like the seed's short UUIDs).
func newServerID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func nowMs() uint64 { return uint64(time.Now().UnixMilli()) }

// admitGroup passes a group message through the fan-out gate (see
// Overloader); false: refuse it with rate_limited.
func (g *Gateway) admitGroup(ctx context.Context) bool {
	return g.fanout == nil || g.fanout.admit(ctx)
}

// busyReason is the rate_limited reason of a group message the fan-out
// gate refused.
const busyReason = "the server is busy delivering group messages; resend later"
