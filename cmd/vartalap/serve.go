package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vartalap/vartalap/delivery"
	"github.com/vartalap/vartalap/gateway"
	"github.com/vartalap/vartalap/gateway/assets"
	"github.com/vartalap/vartalap/groups"
	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/internal/prom"
	"github.com/vartalap/vartalap/internal/webclient"
	"github.com/vartalap/vartalap/profile"
	"github.com/vartalap/vartalap/profile/firebaseauth"
	"github.com/vartalap/vartalap/push"
	"github.com/vartalap/vartalap/push/fcm"
	"github.com/vartalap/vartalap/router"
	"github.com/vartalap/vartalap/schema"
)

// serve runs `vartalap serve` until ctx ends, then shuts down in order:
// close sockets (1001 going away), stop HTTP, stop consumers, drain NATS,
// stop the embedded server; all within --shutdown-timeout.
func serve(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	c, err := parseServe(args, getenv, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	log, err := newLogger(c, stderr)
	if err != nil {
		return err
	}
	if err := checkSafety(c, getenv, log); err != nil {
		return err
	}
	if err := os.MkdirAll(c.DataDir, 0o750); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	// One registry for the process: the Go runtime and process collectors
	// here, every service's own collectors through its Config.Metrics.
	reg := prometheus.NewRegistry()
	if err := prom.Register(reg, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
		return err
	}

	// NATS: embedded unless --nats-url.
	var emb *embedded
	if c.NATSURL == "" {
		emb, err = startEmbedded(c, log)
		if err != nil {
			return err
		}
		log.Info("embedded nats started", "store", filepath.Join(c.DataDir, "jetstream"), "sync", c.Sync)
	}
	stopNATS := func() {
		if emb != nil {
			sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownGrace)
			defer cancel()
			emb.shutdown(sctx)
		}
	}
	pool := &conns{c: c, e: emb, log: log}
	app, err := build(ctx, c, pool, reg, getenv, log)
	if err != nil {
		pool.drain(c.ShutdownGrace)
		stopNATS()
		return err
	}
	runErr := app.run(ctx, c, log)

	// Drain NATS, then stop the embedded server.
	pool.drain(c.ShutdownGrace)
	stopNATS()
	log.Info("stopped")
	return runErr
}

func newLogger(c *serveConfig, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	if c.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}

// checkSafety refuses configurations that would expose an unauthenticated
// server.
func checkSafety(c *serveConfig, getenv func(string) string, log *slog.Logger) error {
	if c.AuthProvider == "dev" && c.has("profile") {
		if !isLoopback(c.HTTPAddr) && !c.AllowDevAuth {
			return fmt.Errorf("the dev auth provider accepts any login token; refusing to serve it on %s (use --auth-provider firebase, a loopback --http-addr, or --allow-dev-auth)", c.HTTPAddr)
		}
		log.Warn("DEV AUTH PROVIDER: any login token is accepted and usernames are not verified; never use this in production", "http_addr", c.HTTPAddr)
	}
	if h := getenv("FIREBASE_AUTH_EMULATOR_HOST"); h != "" && !isLoopback(c.HTTPAddr) {
		return fmt.Errorf("FIREBASE_AUTH_EMULATOR_HOST is set (it turns off ID-token signature checks); refusing to serve on %s", c.HTTPAddr)
	}
	return nil
}

// app is the set of services this process runs.
type app struct {
	nc       *nats.Conn
	js       jetstream.JetStream
	profile  *profile.Service
	delivery *delivery.Service
	router   *router.Router
	groups   *groups.Service
	push     *push.Service
	assets   *assets.Service
	gateway  *gateway.Gateway
	handler  http.Handler
	metrics  *prometheus.Registry // served on --metrics-addr
}

// build constructs and sets up every service named in --services, their
// metrics registered with reg. This is the one place where services are
// wired to each other.
//
// Each service gets a NATS connection of its own (see conns); the process's
// own connection serves readiness and the clients of services that run
// elsewhere.
func build(ctx context.Context, c *serveConfig, pool *conns, reg *prometheus.Registry, getenv func(string) string, log *slog.Logger) (*app, error) {
	nc, js, err := pool.open("app")
	if err != nil {
		return nil, err
	}
	a := &app{nc: nc, js: js, metrics: reg}
	setupCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()

	var authn api.Authenticator
	if c.has("profile") {
		var verifier profile.TokenVerifier = profile.DevVerifier{}
		bind := false
		if c.AuthProvider == "firebase" {
			v, err := firebaseauth.New(setupCtx, c.FirebaseProj, c.FirebaseCreds)
			if err != nil {
				return nil, fmt.Errorf("firebase auth: %w", err)
			}
			verifier, bind = v, true
		}
		pnc, _, err := pool.open("profile")
		if err != nil {
			return nil, err
		}
		p, err := profile.New(profile.Config{
			Path:         filepath.Join(c.DataDir, "profile.db"),
			Verifier:     verifier,
			BindUsername: bind,
			NC:           pnc,
			Logger:       log.With("service", "profile"),
		})
		if err != nil {
			return nil, fmt.Errorf("profile: %w", err)
		}
		a.profile, authn = p, p
	} else {
		authn = profile.NewClient(nc, 5*time.Second)
	}

	if c.has("groups") {
		gnc, gjs, err := pool.open("groups")
		if err != nil {
			return nil, err
		}
		g, err := groups.New(groups.Config{JS: gjs, NC: gnc, Logger: log.With("service", "groups"), Auth: authn,
			Replicas: c.Replicas, Retention: c.Retention})
		if err != nil {
			return nil, fmt.Errorf("groups: %w", err)
		}
		if err := g.Setup(setupCtx); err != nil {
			return nil, fmt.Errorf("groups setup: %w", err)
		}
		a.groups = g
	}

	// Membership, for the router, delivery and push: the groups service of
	// this process, or the one elsewhere over NATS.
	var members groupsSource = groups.NewClient(nc, 5*time.Second)
	if a.groups != nil {
		members = a.groups
	}

	if c.has("delivery") || c.has("gateway") || c.has("push") {
		dnc, djs, err := pool.open("delivery")
		if err != nil {
			return nil, err
		}
		d, err := delivery.New(delivery.Config{
			JS: djs, NC: dnc, Logger: log.With("service", "delivery"),
			Node: c.Node, Retention: c.Retention, Replicas: c.Replicas, Metrics: reg,
			DeviceIdle: deviceIdle(c.DeviceIdle), Groups: members,
		})
		if err != nil {
			return nil, fmt.Errorf("delivery: %w", err)
		}
		if c.has("delivery") {
			if err := d.Setup(setupCtx); err != nil {
				return nil, fmt.Errorf("delivery setup: %w", err)
			}
		}
		a.delivery = d
	}

	if c.has("router") {
		rnc, rjs, err := pool.open("router")
		if err != nil {
			return nil, err
		}
		r, err := router.New(router.Config{JS: rjs, NC: rnc, Logger: log.With("service", "router"), Replicas: c.Replicas,
			Groups: groupsAdapter{members}, Metrics: reg})
		if err != nil {
			return nil, fmt.Errorf("router: %w", err)
		}
		if err := r.Setup(setupCtx); err != nil {
			return nil, fmt.Errorf("router setup: %w", err)
		}
		a.router = r
	}

	if c.has("gateway") {
		wnc, wjs, err := pool.open("gateway")
		if err != nil {
			return nil, err
		}
		g, err := gateway.New(gateway.Config{
			JS: wjs, NC: wnc, Logger: log.With("service", "gateway"),
			Auth:          authn,
			Delivery:      deliveryAdapter{a.delivery},
			Ready:         a.ready,
			Static:        webclient.FS(),
			RatePerSecond: c.WSRate,
			WriteCoalesce: coalesce(c.WSCoalesce),
			Node:          gatewayNode(c, a.delivery),
			Metrics:       reg,
		})
		if err != nil {
			return nil, fmt.Errorf("gateway: %w", err)
		}
		a.gateway = g

		as, err := assets.New(assets.Config{JS: wjs, Logger: log.With("service", "assets"), Auth: authn,
			Replicas: c.Replicas, MaxBytes: c.MaxUpload})
		if err != nil {
			return nil, fmt.Errorf("assets: %w", err)
		}
		if err := as.Setup(setupCtx); err != nil {
			return nil, fmt.Errorf("assets setup: %w", err)
		}
		a.assets = as
	}

	if c.has("push") && c.PushProvider != "none" {
		var sender push.Sender
		if c.PushProvider == "fcm" {
			fs, err := fcm.New(setupCtx, c.FirebaseProj, c.FirebaseCreds, c.FCMEndpoint)
			if err != nil {
				return nil, fmt.Errorf("fcm: %w", err)
			}
			sender = fs
		} else {
			sender = push.NewLogSender(log.With("service", "push"))
		}
		var devs deviceSource = profile.NewClient(nc, 5*time.Second)
		if a.profile != nil {
			devs = a.profile
		}
		_, pjs, err := pool.open("push")
		if err != nil {
			return nil, err
		}
		p, err := push.New(push.Config{
			JS: pjs, Logger: log.With("service", "push"),
			Presence: a.delivery, Devices: pushDevices{devs}, Sender: sender, TTL: c.PushTTL,
			Groups: members, IsNoGroup: func(err error) bool { return errors.Is(err, groups.ErrNotFound) },
			Metrics: reg,
		})
		if err != nil {
			return nil, fmt.Errorf("push: %w", err)
		}
		if err := p.Setup(setupCtx); err != nil {
			return nil, fmt.Errorf("push setup: %w", err)
		}
		a.push = p
	}

	root := chi.NewRouter()
	root.Use(api.StripVersion, recoverer(log), requestLog(log))
	if a.gateway != nil {
		a.gateway.Routes(root)
	} else {
		root.Get("/alive", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "OK") })
	}
	if a.profile != nil {
		a.profile.Routes(root)
	}
	if a.groups != nil {
		a.groups.Routes(root)
	}
	if a.assets != nil {
		a.assets.Routes(root)
	}
	root.NotFound(func(w http.ResponseWriter, _ *http.Request) {
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "no such route")
	})
	root.MethodNotAllowed(func(w http.ResponseWriter, _ *http.Request) {
		api.WriteError(w, http.StatusMethodNotAllowed, "method_not_allowed", "method not allowed on this route")
	})
	a.handler = root
	return a, nil
}

// deviceIdle maps --device-idle to delivery.Config.DeviceIdle: 0 (never)
// is negative there.
func deviceIdle(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// gatewayNode names the gateway in its CHAT_IN subject: --node, else the
// delivery service's default node name.
func gatewayNode(c *serveConfig, d *delivery.Service) string {
	if c.Node != "" {
		return c.Node
	}
	if d != nil {
		return d.Node()
	}
	return ""
}

// ready reports whether this process can serve: NATS connected and the
// streams it depends on present.
func (a *app) ready(ctx context.Context) error {
	if a.nc.Status() != nats.CONNECTED {
		return errors.New("nats not connected")
	}
	for _, s := range []string{schema.StreamChatIn, schema.StreamInbox} {
		if _, err := a.js.Stream(ctx, s); err != nil {
			return fmt.Errorf("stream %s: %w", s, err)
		}
	}
	return nil
}

// run starts the services and the HTTP server, waits for ctx (or a service
// failure), and shuts them down in order.
func (a *app) run(ctx context.Context, c *serveConfig, log *slog.Logger) error {
	// Metrics come first and go last, so a scrape sees the services start
	// and stop.
	if c.MetricsAddr != "" {
		ms, err := startMetrics(c.MetricsAddr, a.metrics, log)
		if err != nil {
			a.closeStores(log)
			return err
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownGrace)
			defer cancel()
			ms.shutdown(sctx)
		}()
	}
	svcCtx, stopSvcs := context.WithCancel(context.Background())
	defer stopSvcs()
	failed := make(chan error, 8)
	var wg sync.WaitGroup
	start := func(name string, run func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := run(svcCtx); err != nil && svcCtx.Err() == nil {
				failed <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}
	if a.profile != nil {
		start("profile", a.profile.Run)
	}
	if a.delivery != nil {
		start("delivery", a.delivery.Run)
	}
	if a.groups != nil {
		start("groups", a.groups.Run)
	}
	if a.router != nil {
		start("router", a.router.Run)
	}
	if a.push != nil {
		start("push", a.push.Run)
	}
	// Open the HTTP port only once the services it calls serve: a client
	// that sees "listening" must be able to open a session at once.
	var starting []<-chan struct{}
	if a.profile != nil {
		starting = append(starting, a.profile.Started())
	}
	if a.delivery != nil {
		starting = append(starting, a.delivery.Started())
	}
	if a.groups != nil {
		starting = append(starting, a.groups.Started())
	}
	for _, up := range starting {
		select {
		case <-up:
		case err := <-failed:
			stopSvcs()
			wg.Wait()
			a.closeStores(log)
			return err
		case <-ctx.Done():
			stopSvcs()
			wg.Wait()
			a.closeStores(log)
			return nil
		}
	}

	ln, err := net.Listen("tcp", c.HTTPAddr)
	if err != nil {
		stopSvcs()
		wg.Wait()
		a.closeStores(log)
		return fmt.Errorf("listen %s: %w", c.HTTPAddr, err)
	}
	hs := &http.Server{
		Handler:           a.handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	httpDone := make(chan error, 1)
	go func() { httpDone <- hs.Serve(ln) }()
	log.Info("listening", "addr", ln.Addr().String(), "services", strings.Join(c.Services, ","))

	var pprofSrv *http.Server
	if c.PprofAddr != "" {
		pprofSrv = startPprof(c.PprofAddr, log)
	}

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case runErr = <-failed:
		log.Error("service failed, shutting down", "err", runErr)
	case err := <-httpDone:
		runErr = fmt.Errorf("http server: %w", err)
		log.Error("http server failed, shutting down", "err", err)
	}

	dctx, cancel := context.WithTimeout(context.Background(), c.ShutdownGrace)
	defer cancel()
	if a.gateway != nil {
		if err := a.gateway.Shutdown(dctx); err != nil {
			log.Warn("gateway shutdown", "err", err)
		}
	}
	if err := hs.Shutdown(dctx); err != nil {
		log.Warn("http shutdown", "err", err)
	}
	if pprofSrv != nil {
		_ = pprofSrv.Shutdown(dctx)
	}
	stopSvcs()
	waited := make(chan struct{})
	go func() { wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-dctx.Done():
		log.Error("services did not stop before the shutdown deadline")
		if runErr == nil {
			runErr = errors.New("shutdown deadline exceeded")
		}
	}
	a.closeStores(log)
	return runErr
}

func (a *app) closeStores(log *slog.Logger) {
	if a.profile != nil {
		if err := a.profile.Close(); err != nil {
			log.Warn("profile close", "err", err)
		}
	}
}

func startPprof(addr string, log *slog.Logger) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	s := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := s.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("pprof server", "err", err)
		}
	}()
	log.Info("pprof listening", "addr", addr)
	return s
}

// metricsServer serves the registry's metrics on GET /metrics, on a
// listener of its own.
type metricsServer struct {
	srv  *http.Server
	done chan struct{} // closed when Serve has returned
}

// startMetrics listens on addr (port 0 picks a free port; the log line
// names the actual address) and serves reg until shutdown.
func startMetrics(addr string, reg *prometheus.Registry, log *slog.Logger) (*metricsServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	m := &metricsServer{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: 10 * time.Second,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		},
		done: make(chan struct{}),
	}
	go func() {
		defer close(m.done)
		if err := m.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	log.Info("metrics listening", "addr", ln.Addr().String())
	return m, nil
}

// shutdown stops the server, waiting for scrapes in progress until ctx
// ends, and joins its goroutine.
func (m *metricsServer) shutdown(ctx context.Context) {
	if err := m.srv.Shutdown(ctx); err != nil {
		_ = m.srv.Close()
	}
	<-m.done
}

// deliveryAdapter lets the gateway open delivery sessions without importing
// the delivery package.
type deliveryAdapter struct{ d *delivery.Service }

// A gateway connection holds frames to share writes (--ws-coalesce); a
// delivery session flushes it after a catch-up.
var _ delivery.Flusher = gateway.Sink(nil)

func (a deliveryAdapter) Open(ctx context.Context, u schema.UserID, dev schema.DeviceID, sink gateway.Sink) (gateway.Session, error) {
	s, err := a.d.Open(ctx, u, dev, sink)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (a deliveryAdapter) AckByID(ctx context.Context, u schema.UserID, dev schema.DeviceID, ids []string) error {
	return a.d.AckByID(ctx, u, dev, ids)
}

// Overloaded slows group senders while this node's sessions fall behind
// (gateway.Overloader).
func (a deliveryAdapter) Overloaded() bool { return a.d.Overloaded() }

var _ gateway.Overloader = deliveryAdapter{}

// groupsSource is what both groups.Service and groups.Client offer.
type groupsSource interface {
	Members(ctx context.Context, g schema.GroupID) ([]schema.UserID, error)
	Memberships(ctx context.Context, u schema.UserID) ([]schema.Membership, error)
}

// groupsAdapter gives the router the groups service's membership, mapping
// the groups package's not-found error to the router's.
type groupsAdapter struct{ m groupsSource }

func (a groupsAdapter) Members(ctx context.Context, g schema.GroupID) ([]schema.UserID, error) {
	ms, err := a.m.Members(ctx, g)
	if errors.Is(err, groups.ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", router.ErrNoGroup, g)
	}
	return ms, err
}

// deviceSource is what both profile.Service and profile.Client offer.
type deviceSource interface {
	Devices(ctx context.Context, user schema.UserID) ([]profile.Device, error)
	RemoveToken(ctx context.Context, user schema.UserID, device schema.DeviceID, token string) error
}

// pushDevices gives the push service the profile service's devices.
type pushDevices struct{ d deviceSource }

func (p pushDevices) Devices(ctx context.Context, u schema.UserID) ([]push.Device, error) {
	ds, err := p.d.Devices(ctx, u)
	if err != nil {
		return nil, err
	}
	out := make([]push.Device, 0, len(ds))
	for _, d := range ds {
		out = append(out, push.Device{ID: d.ID, Token: d.PushToken})
	}
	return out, nil
}

func (p pushDevices) RemoveToken(ctx context.Context, u schema.UserID, dev schema.DeviceID, token string) error {
	return p.d.RemoveToken(ctx, u, dev, token)
}

// coalesce maps --ws-coalesce (0: off) to gateway.Config.WriteCoalesce
// (0: the default, negative: off).
func coalesce(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
