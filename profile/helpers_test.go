package profile_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-chi/chi/v5"
	"github.com/nats-io/nats.go"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/profile"
)

// tableVerifier accepts the tokens in its map; "unavailable" is a
// transient verifier failure; every other token is bad.
type tableVerifier map[string]profile.Claims

var errVerifierDown = errors.New("verifier down")

func (v tableVerifier) Verify(_ context.Context, token string) (profile.Claims, error) {
	if token == "unavailable" {
		return profile.Claims{}, errVerifierDown
	}
	c, ok := v[token]
	if !ok {
		return profile.Claims{}, profile.ErrBadToken
	}
	return c, nil
}

type env struct {
	t    testing.TB
	svc  *profile.Service
	srv  *httptest.Server
	path string
	cfg  profile.Config
}

// newEnv starts a Service on a fresh bbolt file, served over real HTTP
// through chi and api.StripVersion. cfg.Path and cfg.Verifier get test
// defaults when empty.
func newEnv(t testing.TB, cfg profile.Config) *env {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "profile.db")
	}
	if cfg.Verifier == nil {
		cfg.Verifier = profile.DevVerifier{}
	}
	e := &env{t: t, path: cfg.Path, cfg: cfg}
	e.open()
	t.Cleanup(e.close)
	return e
}

func (e *env) open() {
	e.t.Helper()
	svc, err := profile.New(e.cfg)
	if err != nil {
		e.t.Fatalf("profile.New: %v", err)
	}
	r := chi.NewRouter()
	svc.Routes(r)
	e.svc = svc
	e.srv = httptest.NewServer(api.StripVersion(r))
}

// close stops the HTTP server and closes the service; it may be called
// more than once.
func (e *env) close() {
	if e.svc == nil {
		return
	}
	e.srv.Close()
	if err := e.svc.Close(); err != nil {
		e.t.Errorf("Close: %v", err)
	}
	e.svc = nil
}

// reopen closes the service and opens a new one on the same file.
func (e *env) reopen() {
	e.t.Helper()
	e.close()
	e.open()
}

type creds struct{ user, key string }

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode body %q: %v", r.body, err)
	}
}

// errorBody checks that r is a JSON error with the given status and code.
func (r response) errorBody(t *testing.T, status int, code string) api.ErrorBody {
	t.Helper()
	if r.status != status {
		t.Fatalf("status = %d, want %d (body %s)", r.status, status, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type = %q, want application/json", ct)
	}
	var eb api.ErrorBody
	r.json(t, &eb)
	if eb.Status || eb.Error != code {
		t.Fatalf("error body = %+v, want code %q", eb, code)
	}
	return eb
}

// do sends an HTTP request. body may be nil, a string (sent raw) or a value
// encoded as JSON. c, when set, is sent as the user and accesskey headers.
func (e *env) do(method, path string, body any, c *creds, hdr map[string]string) response {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if c != nil {
		req.Header.Set("user", c.user)
		req.Header.Set("accesskey", c.key)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	return e.send(req)
}

func (e *env) send(req *http.Request) response {
	e.t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: raw}
}

type loginResp struct {
	Status    bool   `json:"status"`
	Username  string `json:"username"`
	AccessKey string `json:"accesskey"`
	IsNew     bool   `json:"isNew"`
}

// login logs user in on device with a push token and returns the reply.
func (e *env) login(user, device, pushToken string) loginResp {
	e.t.Helper()
	r := e.do("POST", "/login", map[string]any{
		"username": user, "authToken": "tok-" + user, "deviceId": device, "notificationToken": pushToken,
	}, nil, nil)
	if r.status != http.StatusOK {
		e.t.Fatalf("login %s/%s: status %d body %s", user, device, r.status, r.body)
	}
	var lr loginResp
	r.json(e.t, &lr)
	if !lr.Status || lr.Username != user || lr.AccessKey == "" {
		e.t.Fatalf("login %s/%s: reply %+v", user, device, lr)
	}
	return lr
}

// authStatus returns the status of GET /profile/ with c.
func (e *env) authStatus(c creds) int {
	e.t.Helper()
	return e.do("GET", "/profile/", nil, &c, nil).status
}

// kickSub subscribes to every kick subject.
func kickSub(t *testing.T, nc *nats.Conn) *nats.Subscription {
	t.Helper()
	sub, err := nc.SubscribeSync("ctl.kick.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return sub
}
