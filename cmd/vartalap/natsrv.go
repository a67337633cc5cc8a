package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/crypto/bcrypt"
)

// cliUser is the NATS user the embedded server accepts on --nats-listen.
const cliUser = "vartalap"

// embedded is a running in-process nats-server.
type embedded struct {
	srv      *server.Server
	password string // set when the server listens with credentials
}

// startEmbedded starts nats-server with JetStream on dataDir/jetstream.
// Without listen it opens no port at all (clients connect in-process).
func startEmbedded(c *serveConfig, log *slog.Logger) (*embedded, error) {
	opts := &server.Options{
		ServerName: "vartalap",
		JetStream:  true,
		StoreDir:   filepath.Join(c.DataDir, "jetstream"),
		SyncAlways: c.Sync == "always",
		NoSigs:     true,
		DontListen: c.NATSListen == "",
		// The per-stream consumer cap (1,000 by default since 2.15) is set
		// explicitly per stream by its owner; keep the server default.
	}
	e := &embedded{}
	if c.NATSListen != "" {
		host, port, err := net.SplitHostPort(c.NATSListen)
		if err != nil {
			return nil, fmt.Errorf("--nats-listen: %w", err)
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return nil, fmt.Errorf("--nats-listen port: %w", err)
		}
		opts.Host, opts.Port = host, p
		pw, err := cliPassword(c.DataDir)
		if err != nil {
			return nil, err
		}
		e.password = pw
		// The server keeps only a bcrypt hash of the password. The password
		// is 192 random bits, so a slow hash adds nothing against guessing;
		// the lowest cost keeps each connect (the server checks the hash
		// every time, also for this process's own connection) at about a
		// millisecond instead of a costly one that timed connects out on a
		// loaded machine.
		hash, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
		if err != nil {
			return nil, fmt.Errorf("hash nats password: %w", err)
		}
		opts.Users = []*server.User{{Username: cliUser, Password: string(hash)}}
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("new nats server: %w", err)
	}
	srv.SetLoggerV2(natsLogger{log.With("component", "nats")}, false, false, false)
	go srv.Start()
	// Start recovers every stream before it is ready; allow for a big store.
	if !srv.ReadyForConnections(2 * time.Minute) {
		srv.Shutdown()
		return nil, errors.New("embedded nats server did not become ready")
	}
	e.srv = srv
	if c.NATSListen != "" {
		log.Info("nats listening", "addr", srv.Addr().String(), "user", cliUser,
			"credentials", filepath.Join(c.DataDir, "nats-cli.env"))
		if err := writeCLIEnv(c.DataDir, srv.Addr().String(), e.password); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// conns opens and closes the process's NATS connections: one per service
// (and one for the process itself: readiness, the service clients). On one
// shared connection every publish, request and reply of every service went
// through one client read loop and one flusher, and through one client
// connection in the server, which handles its inbound messages one at a
// time: a busy service (delivery's cursor writes and catch-up reads) made
// the others (the gateway's commits, the router's batches) wait.
type conns struct {
	c   *serveConfig
	e   *embedded
	log *slog.Logger

	mu  sync.Mutex
	all []*nats.Conn
}

// open returns a new connection for service and its JetStream context.
func (p *conns) open(service string) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := connect(p.c, p.e, service, p.log)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	p.mu.Lock()
	p.all = append(p.all, nc)
	p.mu.Unlock()
	return nc, js, nil
}

// drain drains every connection (their subscriptions' pending messages are
// processed, their publishes flushed) and closes them, waiting at most
// grace.
func (p *conns) drain(grace time.Duration) {
	p.mu.Lock()
	all := p.all
	p.all = nil
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, nc := range all {
		closed := make(chan struct{})
		nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
		if err := nc.Drain(); err != nil {
			nc.Close()
			continue
		}
		wg.Go(func() {
			select {
			case <-closed:
			case <-time.After(grace):
				p.log.Warn("nats drain timed out", "conn", nc.Opts.Name)
				nc.Close()
			}
		})
	}
	wg.Wait()
}

// connect opens a NATS connection named for service: in-process to the
// embedded server, or to --nats-url.
func connect(c *serveConfig, e *embedded, service string, log *slog.Logger) (*nats.Conn, error) {
	log = log.With("conn", service)
	opts := []nats.Option{
		nats.Name("vartalap-" + service),
		nats.Timeout(10 * time.Second),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subj := ""
			if sub != nil {
				subj = sub.Subject
			}
			log.Warn("nats async error", "subject", subj, "err", err)
		}),
	}
	if e != nil {
		opts = append(opts, nats.InProcessServer(e.srv))
		if e.password != "" {
			opts = append(opts, nats.UserInfo(cliUser, e.password))
		}
		return nats.Connect("", opts...)
	}
	if c.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(c.NATSCreds))
	}
	nc, err := nats.Connect(c.NATSURL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", c.NATSURL, err)
	}
	return nc, nil
}

// cliPassword returns the password for --nats-listen, generated on first
// start and kept (mode 0600) in the data dir.
func cliPassword(dataDir string) (string, error) {
	path := filepath.Join(dataDir, "nats-cli.password")
	if b, err := os.ReadFile(path); err == nil {
		if pw := strings.TrimSpace(string(b)); pw != "" {
			return pw, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	buf := make([]byte, 24)
	if _, err := rand.Read(buf); err != nil {
		return "", err
	}
	pw := base64.RawURLEncoding.EncodeToString(buf)
	if err := os.WriteFile(path, []byte(pw+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	return pw, nil
}

// writeCLIEnv writes a file the README tells operators to source before
// using the nats CLI: NATS_URL, NATS_USER, NATS_PASSWORD.
func writeCLIEnv(dataDir, addr, pw string) error {
	path := filepath.Join(dataDir, "nats-cli.env")
	s := fmt.Sprintf("export NATS_URL=nats://%s\nexport NATS_USER=%s\nexport NATS_PASSWORD=%s\n", addr, cliUser, pw)
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// shutdown stops the embedded server and waits, bounded by ctx.
func (e *embedded) shutdown(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		e.srv.Shutdown()
		e.srv.WaitForShutdown()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// natsLogger routes nats-server logs into slog.
type natsLogger struct{ l *slog.Logger }

func (n natsLogger) Noticef(f string, v ...any) {
	n.l.Info("nats server", "detail", fmt.Sprintf(f, v...))
}
func (n natsLogger) Warnf(f string, v ...any) {
	n.l.Warn("nats server", "detail", fmt.Sprintf(f, v...))
}
func (n natsLogger) Fatalf(f string, v ...any) {
	n.l.Error("nats server", "detail", fmt.Sprintf(f, v...))
}
func (n natsLogger) Errorf(f string, v ...any) {
	n.l.Error("nats server", "detail", fmt.Sprintf(f, v...))
}
func (n natsLogger) Debugf(f string, v ...any) {
	n.l.Debug("nats server", "detail", fmt.Sprintf(f, v...))
}
func (n natsLogger) Tracef(f string, v ...any) {
	n.l.Debug("nats server", "detail", fmt.Sprintf(f, v...))
}
