package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/vartalap/vartalap/gateway"
)

// allServices is every service `serve` can run, in start-up order.
var allServices = []string{"profile", "delivery", "router", "groups", "push", "gateway"}

// serveConfig is everything `vartalap serve` is told by flags and VARTALAP_* variables.
type serveConfig struct {
	HTTPAddr      string
	DataDir       string
	NATSURL       string
	NATSListen    string
	NATSCreds     string
	Services      []string
	AuthProvider  string
	FirebaseProj  string
	FirebaseCreds string
	AllowDevAuth  bool
	Sync          string
	LogFormat     string
	LogLevel      string
	Retention     time.Duration
	DeviceIdle    time.Duration
	Replicas      int
	PushProvider  string
	FCMEndpoint   string
	PushTTL       time.Duration
	WSRate        float64
	WSCoalesce    time.Duration
	MaxUpload     int64
	PprofAddr     string
	MetricsAddr   string
	ShutdownGrace time.Duration
	Node          string
}

// envName is the environment variable for a flag: --http-addr → VARTALAP_HTTP_ADDR.
func envName(flagName string) string {
	return "VARTALAP_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parseServe parses the serve flags. A flag given on the command line wins
// over its environment variable, which wins over the default.
func parseServe(args []string, getenv func(string) string, stderr io.Writer) (*serveConfig, error) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	c := &serveConfig{}
	var services string
	fs.StringVar(&c.HTTPAddr, "http-addr", "127.0.0.1:8080", "HTTP and WebSocket listen address (port 0 picks a free port)")
	fs.StringVar(&c.DataDir, "data-dir", "./data", "directory for the JetStream store and the profile database")
	fs.StringVar(&c.NATSURL, "nats-url", "", "external NATS server or cluster URL(s); empty starts an embedded server")
	fs.StringVar(&c.NATSListen, "nats-listen", "", "let the embedded server listen here (e.g. 127.0.0.1:4222) for the nats CLI; credentials are generated in the data dir")
	fs.StringVar(&c.NATSCreds, "nats-creds", "", "credentials file for --nats-url")
	fs.StringVar(&services, "services", strings.Join(allServices, ","), "comma-separated services to run: "+strings.Join(allServices, ","))
	fs.StringVar(&c.AuthProvider, "auth-provider", "dev", "login token verifier: dev (accepts any token) or firebase")
	fs.StringVar(&c.FirebaseProj, "firebase-project", "", "Firebase project id (auth-provider firebase)")
	fs.StringVar(&c.FirebaseCreds, "firebase-credentials", "", "Firebase service-account JSON (optional for auth)")
	fs.StringVar(&c.PushProvider, "push-provider", "log", "push notifications: fcm (Firebase Cloud Messaging), log (log what would be sent) or none")
	fs.StringVar(&c.FCMEndpoint, "fcm-endpoint", "", "send FCM requests to this base URL without Google credentials (tests, emulators)")
	fs.DurationVar(&c.PushTTL, "push-ttl", 24*time.Hour, "how long FCM keeps an undelivered push")
	fs.BoolVar(&c.AllowDevAuth, "allow-dev-auth", false, "allow the dev auth provider on a non-loopback --http-addr")
	fs.StringVar(&c.Sync, "sync", "always", "embedded JetStream fsync: always (fsync before every ack) or interval (every 2 min)")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.DurationVar(&c.Retention, "retention", 30*24*time.Hour, "how long an unacknowledged message is kept in an inbox")
	fs.DurationVar(&c.DeviceIdle, "device-idle", 14*24*time.Hour, "a device not seen for this long no longer holds back its user's inbox purges (0: never)")
	fs.IntVar(&c.Replicas, "replicas", 1, "stream and bucket replicas (3 in a NATS cluster)")
	fs.Float64Var(&c.WSRate, "ws-rate", 50, "messages per second each WebSocket may send (burst: twice that); excess frames get a rate_limited error")
	fs.DurationVar(&c.WSCoalesce, "ws-coalesce", gateway.DefaultWriteCoalesce, "how long frames to a busy WebSocket (frames lately less than this apart) wait to share one write (0: write each frame at once)")
	fs.Int64Var(&c.MaxUpload, "max-upload", 25<<20, "largest file a client may upload, in bytes")
	fs.StringVar(&c.PprofAddr, "pprof", "", "serve net/http/pprof on this address (off when empty)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", "", "serve Prometheus metrics (GET /metrics) on this address (off when empty; port 0 picks one, logged as addr=)")
	fs.DurationVar(&c.ShutdownGrace, "shutdown-timeout", 15*time.Second, "hard deadline for a clean shutdown")
	fs.StringVar(&c.Node, "node", "", "this process's node name in presence (default hostname-pid)")

	// Environment first, so that explicit flags parsed afterwards win.
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if v := getenv(envName(f.Name)); v != "" && envErr == nil {
			if err := fs.Set(f.Name, v); err != nil {
				envErr = fmt.Errorf("%s: %w", envName(f.Name), err)
			}
		}
	})
	if envErr != nil {
		return nil, envErr
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	for _, s := range strings.Split(services, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if s == "all" {
			c.Services = append(c.Services, allServices...)
			continue
		}
		if !slices.Contains(allServices, s) {
			return nil, fmt.Errorf("--services: unknown service %q (known: %s)", s, strings.Join(allServices, ","))
		}
		if !slices.Contains(c.Services, s) {
			c.Services = append(c.Services, s)
		}
	}
	if len(c.Services) == 0 {
		return nil, fmt.Errorf("--services: no service named")
	}
	switch c.AuthProvider {
	case "dev", "firebase":
	default:
		return nil, fmt.Errorf("--auth-provider: %q is neither dev nor firebase", c.AuthProvider)
	}
	if c.AuthProvider == "firebase" && c.FirebaseProj == "" {
		return nil, fmt.Errorf("--auth-provider firebase needs --firebase-project")
	}
	switch c.PushProvider {
	case "fcm", "log", "none":
	default:
		return nil, fmt.Errorf("--push-provider: %q is not fcm, log or none", c.PushProvider)
	}
	if c.PushProvider == "fcm" && c.FirebaseProj == "" {
		return nil, fmt.Errorf("--push-provider fcm needs --firebase-project")
	}
	if c.DeviceIdle < 0 {
		return nil, fmt.Errorf("--device-idle: %v is negative (0 means never)", c.DeviceIdle)
	}
	switch c.Sync {
	case "always", "interval":
	default:
		return nil, fmt.Errorf("--sync: %q is neither always nor interval", c.Sync)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return nil, fmt.Errorf("--log-format: %q is neither text nor json", c.LogFormat)
	}
	if c.MaxUpload <= 0 {
		return nil, fmt.Errorf("--max-upload must be positive")
	}
	if c.WSCoalesce < 0 || c.WSCoalesce > time.Second {
		return nil, fmt.Errorf("--ws-coalesce must be between 0 and 1s")
	}
	if c.WSRate <= 0 {
		return nil, fmt.Errorf("--ws-rate must be positive")
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		return nil, fmt.Errorf("--replicas: %d is not between 1 and 5", c.Replicas)
	}
	if c.NATSURL != "" && c.NATSListen != "" {
		return nil, fmt.Errorf("--nats-listen only applies to the embedded server; drop it or --nats-url")
	}
	return c, nil
}

// has reports whether service s runs in this process.
func (c *serveConfig) has(s string) bool { return slices.Contains(c.Services, s) }

// isLoopback reports whether a listen address only accepts local connections.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
