package assets

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

// keyAuth accepts the access key "key-<user>" for user.
type keyAuth struct{}

func (keyAuth) Authenticate(_ context.Context, user, key string) (api.Identity, error) {
	if key != "key-"+user {
		return api.Identity{}, api.ErrUnauthenticated
	}
	return api.Identity{User: schema.UserID(user), Device: "d1"}, nil
}

type env struct {
	t     *testing.T
	js    jetstream.JetStream
	svc   *Service
	srv   *httptest.Server
	clock atomic.Int64 // Unix nanoseconds
}

func newEnv(t *testing.T, maxBytes int64) *env {
	t.Helper()
	ns := natstest.Start(t)
	_, js := ns.JetStream(t)
	e := &env{t: t, js: js}
	e.clock.Store(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano())
	svc, err := New(Config{
		JS:       js,
		Auth:     keyAuth{},
		MaxBytes: maxBytes,
		Now:      func() time.Time { return time.Unix(0, e.clock.Load()) },
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := svc.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	e.svc = svc
	r := chi.NewRouter()
	svc.Routes(r)
	e.srv = httptest.NewServer(api.StripVersion(r))
	t.Cleanup(e.srv.Close)
	return e
}

func (e *env) advance(d time.Duration) { e.clock.Add(int64(d)) }

// do sends a request to path (relative to the server, or an absolute URL);
// user "" sends no credentials.
func (e *env) do(method, path, user string, body []byte) (int, http.Header, []byte) {
	e.t.Helper()
	u := path
	if !strings.HasPrefix(path, "http") {
		u = e.srv.URL + path
	}
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	if err != nil {
		e.t.Fatalf("new request: %v", err)
	}
	if user != "" {
		req.Header.Set("user", user)
		req.Header.Set("accesskey", "key-"+user)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("read body: %v", err)
	}
	return resp.StatusCode, resp.Header, b
}

func (e *env) mustStatus(want int, method, path, user string, body []byte) []byte {
	e.t.Helper()
	got, _, b := e.do(method, path, user, body)
	if got != want {
		e.t.Fatalf("%s %s: status %d, want %d; body %s", method, path, got, want, b)
	}
	return b
}

// uploadURL asks for an upload URL with GET on prefix ("/assets", "/file",
// optionally under "/v1.0").
func (e *env) uploadURL(prefix, user, ext string) (putURL, fileID string) {
	e.t.Helper()
	b := e.mustStatus(http.StatusOK, http.MethodGet,
		prefix+"/upload/presigned_url?ext="+url.QueryEscape(ext)+"&category=chat", user, nil)
	var resp struct {
		URL    string `json:"url"`
		FileID string `json:"fileId"`
	}
	if err := json.Unmarshal(b, &resp); err != nil {
		e.t.Fatalf("decode %s: %v", b, err)
	}
	if !fileIDRE.MatchString(resp.FileID) {
		e.t.Fatalf("fileId %q is not 24 hex chars", resp.FileID)
	}
	return resp.URL, resp.FileID
}

func (e *env) downloadURL(prefix, user, fileID string) string {
	e.t.Helper()
	b := e.mustStatus(http.StatusOK, http.MethodGet, prefix+"/download/"+fileID+"/presigned_url", user, nil)
	var resp struct {
		URL string `json:"url"`
	}
	if err := json.Unmarshal(b, &resp); err != nil {
		e.t.Fatalf("decode %s: %v", b, err)
	}
	return resp.URL
}

// complete uploads data and marks the file done, returning its id.
func (e *env) complete(user, ext string, data []byte) string {
	e.t.Helper()
	put, id := e.uploadURL("/assets", user, ext)
	e.mustStatus(http.StatusOK, http.MethodPut, put, "", data)
	e.mustStatus(http.StatusOK, http.MethodPut, "/assets/"+id+"/status", user, []byte(`{"status":true}`))
	return id
}

func errorCode(t *testing.T, b []byte) string {
	t.Helper()
	var eb api.ErrorBody
	if err := json.Unmarshal(b, &eb); err != nil {
		t.Fatalf("error body %q is not JSON: %v", b, err)
	}
	return eb.Error
}

func TestFlow(t *testing.T) {
	e := newEnv(t, 0)
	data := bytes.Repeat([]byte("vartalap-asset-"), 20000) // 300 kB: several chunks
	tests := []struct {
		name, prefix, ext, wantType string
	}{
		{"assets", "/assets", ".png", "image/png"},
		{"file", "/file", ".PDF", "application/pdf"},
		{"v1.0 assets", "/v1.0/assets", ".jpg", "image/jpeg"},
		{"unknown ext", "/v1.0/file", ".zzqx9", "application/octet-stream"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			put, id := e.uploadURL(tc.prefix, "alice", tc.ext)
			pu, err := url.Parse(put)
			if err != nil {
				t.Fatalf("parse %q: %v", put, err)
			}
			if got, want := pu.Scheme+"://"+pu.Host, e.srv.URL; got != want {
				t.Fatalf("upload base %q, want %q", got, want)
			}
			if pu.Path != "/assets/blob/"+id || pu.Query().Get("op") != "put" {
				t.Fatalf("upload url %q", put)
			}
			e.mustStatus(http.StatusOK, http.MethodPut, put, "", data)
			e.mustStatus(http.StatusOK, http.MethodPut, tc.prefix+"/"+id+"/status", "alice", []byte(`{"status":true}`))
			// Any authenticated user may download, like the seed.
			get := e.downloadURL(tc.prefix, "bob", id)
			status, h, got := e.do(http.MethodGet, get, "", nil)
			if status != http.StatusOK {
				t.Fatalf("GET blob: %d %s", status, got)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("downloaded %d bytes, want the %d uploaded", len(got), len(data))
			}
			if ct := h.Get("Content-Type"); ct != tc.wantType {
				t.Fatalf("Content-Type %q, want %q", ct, tc.wantType)
			}
			if cl := h.Get("Content-Length"); cl != "300000" {
				t.Fatalf("Content-Length %q, want 300000", cl)
			}
		})
	}
}

func TestLegacyPostUploadURL(t *testing.T) {
	e := newEnv(t, 0)
	for _, prefix := range []string{"/assets", "/file", "/v1.0/file"} {
		t.Run(prefix, func(t *testing.T) {
			e.t = t
			b := e.mustStatus(http.StatusOK, http.MethodPost, prefix+"/upload/presigned_url", "alice",
				[]byte(`{"ext":".txt","category":"profile_pic"}`))
			var resp struct{ URL, FileID string }
			if err := json.Unmarshal(b, &resp); err != nil {
				t.Fatalf("decode %s: %v", b, err)
			}
			e.mustStatus(http.StatusOK, http.MethodPut, resp.URL, "", []byte("hello"))
			e.mustStatus(http.StatusOK, http.MethodPut, prefix+"/"+resp.FileID+"/status", "alice", []byte(`{"status":true}`))
			_, h, got := e.do(http.MethodGet, e.downloadURL(prefix, "alice", resp.FileID), "", nil)
			if string(got) != "hello" || !strings.HasPrefix(h.Get("Content-Type"), "text/plain") {
				t.Fatalf("got %q as %q", got, h.Get("Content-Type"))
			}
		})
	}
}

func TestStatus(t *testing.T) {
	e := newEnv(t, 0)
	put, uploaded := e.uploadURL("/assets", "alice", ".png")
	e.mustStatus(http.StatusOK, http.MethodPut, put, "", []byte("png"))
	done := e.complete("alice", ".png", []byte("done"))
	_, notUploaded := e.uploadURL("/assets", "alice", ".png")

	tests := []struct {
		name, user, id, body string
		want                 int
		wantCode             string
	}{
		{"other user", "bob", uploaded, `{"status":true}`, http.StatusNotFound, api.CodeNotFound},
		{"missing file", "alice", "0123456789abcdef01234567", `{"status":true}`, http.StatusNotFound, api.CodeNotFound},
		{"malformed id", "alice", "not-an-id", `{"status":true}`, http.StatusBadRequest, api.CodeBadRequest},
		{"status missing", "alice", uploaded, `{}`, http.StatusBadRequest, api.CodeBadRequest},
		{"bad json", "alice", uploaded, `{`, http.StatusBadRequest, api.CodeBadRequest},
		{"not uploaded", "alice", notUploaded, `{"status":true}`, http.StatusConflict, "conflict"},
		{"already true", "alice", done, `{"status":true}`, http.StatusBadRequest, api.CodeBadRequest},
		{"owner", "alice", uploaded, `{"status":true}`, http.StatusOK, ""},
		{"owner again", "alice", uploaded, `{"status":true}`, http.StatusBadRequest, api.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			b := e.mustStatus(tc.want, http.MethodPut, "/assets/"+tc.id+"/status", tc.user, []byte(tc.body))
			if tc.wantCode != "" {
				if got := errorCode(t, b); got != tc.wantCode {
					t.Fatalf("error code %q, want %q", got, tc.wantCode)
				}
			}
		})
	}
}

func TestDownloadURLNotReady(t *testing.T) {
	e := newEnv(t, 0)
	_, fresh := e.uploadURL("/assets", "alice", ".png")
	put, uploaded := e.uploadURL("/assets", "alice", ".png")
	e.mustStatus(http.StatusOK, http.MethodPut, put, "", []byte("x"))
	tests := []struct {
		name, id string
		want     int
	}{
		{"before upload", fresh, http.StatusNotFound},
		{"before status", uploaded, http.StatusNotFound},
		{"unknown", "ffffffffffffffffffffffff", http.StatusNotFound},
		{"malformed", "xyz", http.StatusBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			for _, prefix := range []string{"/assets", "/file"} {
				e.mustStatus(tc.want, http.MethodGet, prefix+"/download/"+tc.id+"/presigned_url", "bob", nil)
			}
		})
	}
}

func TestSignatures(t *testing.T) {
	e := newEnv(t, 0)
	id := e.complete("alice", ".png", []byte("signed"))
	get := e.downloadURL("/assets", "alice", id)
	put, fresh := e.uploadURL("/assets", "alice", ".png")
	other := e.complete("alice", ".png", []byte("other"))

	tamper := func(raw, key, val string) string {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatalf("parse: %v", err)
		}
		q := u.Query()
		q.Set(key, val)
		u.RawQuery = q.Encode()
		return u.String()
	}
	sig := func(raw string) string {
		u, _ := url.Parse(raw)
		return u.Query().Get("sig")
	}
	flipped := []byte(sig(get))
	if flipped[0] == '0' {
		flipped[0] = '1'
	} else {
		flipped[0] = '0'
	}

	tests := []struct {
		name, method, url string
	}{
		{"get bad sig", http.MethodGet, tamper(get, "sig", string(flipped))},
		{"get sig not hex", http.MethodGet, tamper(get, "sig", "zz")},
		{"get no sig", http.MethodGet, tamper(get, "sig", "")},
		{"get later exp", http.MethodGet, tamper(get, "exp", "99999999999")},
		{"get as put", http.MethodGet, tamper(get, "op", "put")},
		{"put with get url", http.MethodPut, get},
		{"get other file", http.MethodGet, strings.Replace(get, id, other, 1)},
		{"put other file", http.MethodPut, strings.Replace(put, fresh, other, 1)},
		{"put bad sig", http.MethodPut, tamper(put, "sig", string(flipped))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			b := e.mustStatus(http.StatusForbidden, tc.method, tc.url, "", []byte("evil"))
			if got := errorCode(t, b); got != api.CodeForbidden {
				t.Fatalf("error code %q", got)
			}
		})
	}
	t.Run("unchanged", func(t *testing.T) {
		e.t = t
		if b := e.mustStatus(http.StatusOK, http.MethodGet, get, "", nil); string(b) != "signed" {
			t.Fatalf("got %q", b)
		}
	})
	t.Run("expired", func(t *testing.T) {
		e.t = t
		e.advance(10*time.Minute + 2*time.Second)
		e.mustStatus(http.StatusForbidden, http.MethodGet, get, "", nil)
		e.mustStatus(http.StatusForbidden, http.MethodPut, put, "", []byte("late"))
		// A fresh URL works again.
		if b := e.mustStatus(http.StatusOK, http.MethodGet, e.downloadURL("/file", "bob", id), "", nil); string(b) != "signed" {
			t.Fatalf("got %q", b)
		}
	})
}

func TestUploadLimits(t *testing.T) {
	const max = 1000
	e := newEnv(t, max)
	tests := []struct {
		name    string
		size    int
		chunked bool
		want    int
	}{
		{"at limit", max, false, http.StatusOK},
		{"over limit", max + 1, false, http.StatusRequestEntityTooLarge},
		{"over limit chunked", 5 * max, true, http.StatusRequestEntityTooLarge},
		{"at limit chunked", max, true, http.StatusOK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			put, id := e.uploadURL("/assets", "alice", ".bin")
			var body io.Reader = bytes.NewReader(make([]byte, tc.size))
			if tc.chunked {
				body = io.MultiReader(body) // hides the length: chunked encoding
			}
			req, err := http.NewRequest(http.MethodPut, put, body)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("PUT: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
			}
			wantStatus := http.StatusOK
			if tc.want != http.StatusOK {
				wantStatus = http.StatusConflict // nothing was stored
			}
			e.mustStatus(wantStatus, http.MethodPut, "/assets/"+id+"/status", "alice", []byte(`{"status":true}`))
		})
	}
	t.Run("no overwrite after status", func(t *testing.T) {
		e.t = t
		put, id := e.uploadURL("/assets", "alice", ".bin")
		e.mustStatus(http.StatusOK, http.MethodPut, put, "", []byte("first"))
		e.mustStatus(http.StatusOK, http.MethodPut, "/assets/"+id+"/status", "alice", []byte(`{"status":true}`))
		e.mustStatus(http.StatusConflict, http.MethodPut, put, "", []byte("second"))
		if b := e.mustStatus(http.StatusOK, http.MethodGet, e.downloadURL("/assets", "alice", id), "", nil); string(b) != "first" {
			t.Fatalf("got %q", b)
		}
	})
}

func TestUploadURLValidation(t *testing.T) {
	e := newEnv(t, 0)
	tests := []struct {
		name, query string
		want        int
	}{
		{"ok", "ext=.png&category=chat", http.StatusOK},
		{"ok dashes", "ext=.tar&category=profile-pic_2", http.StatusOK},
		{"no ext", "category=chat", http.StatusBadRequest},
		{"ext without dot", "ext=png&category=chat", http.StatusBadRequest},
		{"ext too long", "ext=.abcdefghijk&category=chat", http.StatusBadRequest},
		{"ext path", "ext=.png%2F..&category=chat", http.StatusBadRequest},
		{"no category", "ext=.png", http.StatusBadRequest},
		{"category traversal", "ext=.png&category=..%2Fetc", http.StatusBadRequest},
		{"category too long", "ext=.png&category=" + strings.Repeat("a", 33), http.StatusBadRequest},
		{"category dot", "ext=.png&category=a.b", http.StatusBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			e.mustStatus(tc.want, http.MethodGet, "/assets/upload/presigned_url?"+tc.query, "alice", nil)
		})
	}
	t.Run("legacy post bad category", func(t *testing.T) {
		e.t = t
		e.mustStatus(http.StatusBadRequest, http.MethodPost, "/file/upload/presigned_url", "alice",
			[]byte(`{"ext":".png","category":"a/b"}`))
	})
}

func TestUnauthenticated(t *testing.T) {
	e := newEnv(t, 0)
	id := e.complete("alice", ".png", []byte("x"))
	routes := []struct{ method, path, body string }{
		{http.MethodGet, "/assets/upload/presigned_url?ext=.png&category=chat", ""},
		{http.MethodPost, "/file/upload/presigned_url", `{"ext":".png","category":"chat"}`},
		{http.MethodPut, "/assets/" + id + "/status", `{"status":true}`},
		{http.MethodGet, "/v1.0/file/download/" + id + "/presigned_url", ""},
	}
	for _, r := range routes {
		t.Run(r.method+" "+r.path, func(t *testing.T) {
			e.t = t
			b := e.mustStatus(http.StatusUnauthorized, r.method, r.path, "", []byte(r.body))
			if got := errorCode(t, b); got != api.CodeUnauthenticated {
				t.Fatalf("code %q", got)
			}
			req, _ := http.NewRequest(r.method, e.srv.URL+r.path, strings.NewReader(r.body))
			req.Header.Set("user", "alice")
			req.Header.Set("accesskey", "key-bob")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("wrong key: status %d", resp.StatusCode)
			}
		})
	}
}

func TestForwardedBase(t *testing.T) {
	e := newEnv(t, 0)
	req, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/assets/upload/presigned_url?ext=.png&category=chat", nil)
	req.Header.Set("user", "alice")
	req.Header.Set("accesskey", "key-alice")
	req.Header.Set("X-Forwarded-Proto", "https")
	req.Header.Set("X-Forwarded-Host", "chat.example.com, inner.local")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct{ URL string }
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.URL, "https://chat.example.com/assets/blob/") {
		t.Fatalf("url %q", out.URL)
	}
}

func TestSetupIdempotent(t *testing.T) {
	e := newEnv(t, 0)
	id := e.complete("alice", ".png", []byte("kept"))
	get := e.downloadURL("/assets", "alice", id)

	// A second Setup on the same service and a second gateway sharing the
	// buckets both keep the signing key, so issued URLs stay valid.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.svc.Setup(ctx); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	other, err := New(Config{JS: e.js, Auth: keyAuth{}, Now: e.svc.cfg.Now})
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Setup(ctx); err != nil {
		t.Fatalf("Setup on second gateway: %v", err)
	}
	r := chi.NewRouter()
	other.Routes(r)
	srv2 := httptest.NewServer(r)
	defer srv2.Close()
	for _, base := range []string{e.srv.URL, srv2.URL} {
		u := strings.Replace(get, e.srv.URL, base, 1)
		if b := e.mustStatus(http.StatusOK, http.MethodGet, u, "", nil); string(b) != "kept" {
			t.Fatalf("%s: got %q", base, b)
		}
	}
	kv, err := e.js.KeyValue(ctx, MetaBucket)
	if err != nil {
		t.Fatal(err)
	}
	entry, err := kv.Get(ctx, signingKeyKey)
	if err != nil {
		t.Fatal(err)
	}
	if entry.Revision() != 1 {
		t.Fatalf("signing key rewritten: revision %d", entry.Revision())
	}
	if _, err := kv.Get(ctx, metaKey(id)); err != nil {
		t.Fatalf("metadata lost: %v", err)
	}
}

func TestNotReady(t *testing.T) {
	ns := natstest.Start(t)
	_, js := ns.JetStream(t)
	svc, err := New(Config{JS: js, Auth: keyAuth{}})
	if err != nil {
		t.Fatal(err)
	}
	r := chi.NewRouter()
	svc.Routes(r)
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/assets/upload/presigned_url?ext=.png&category=chat", nil)
	req.Header.Set("user", "alice")
	req.Header.Set("accesskey", "key-alice")
	r.ServeHTTP(rec, req)
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("status %d before Setup, want 503", rec.Code)
	}
}

func TestNewValidation(t *testing.T) {
	ns := natstest.Start(t)
	_, js := ns.JetStream(t)
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"defaults", Config{JS: js, Auth: keyAuth{}}, true},
		{"no js", Config{Auth: keyAuth{}}, false},
		{"no auth", Config{JS: js}, false},
		{"negative max", Config{JS: js, Auth: keyAuth{}, MaxBytes: -1}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.cfg)
			if (err == nil) != tc.ok {
				t.Fatalf("err %v, want ok=%v", err, tc.ok)
			}
			if tc.ok && (s.cfg.MaxBytes != 25<<20 || s.cfg.URLExpiry != 10*time.Minute || s.cfg.Replicas != 1) {
				t.Fatalf("defaults not filled: %+v", s.cfg)
			}
		})
	}
}

func TestSignedURLShape(t *testing.T) {
	e := newEnv(t, 0)
	put, id := e.uploadURL("/assets", "alice", ".png")
	u, err := url.Parse(put)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	wantExp := time.Unix(0, e.clock.Load()).Add(10 * time.Minute).Unix()
	if q.Get("exp") != strconv.FormatInt(wantExp, 10) {
		t.Fatalf("exp %q, want %d", q.Get("exp"), wantExp)
	}
	if len(q.Get("sig")) != 64 {
		t.Fatalf("sig %q is not hex SHA-256", q.Get("sig"))
	}
	var m meta
	kv, err := e.js.KeyValue(context.Background(), MetaBucket)
	if err != nil {
		t.Fatal(err)
	}
	entry, err := kv.Get(context.Background(), metaKey(id))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(entry.Value(), &m); err != nil {
		t.Fatal(err)
	}
	want := meta{FileID: id, Owner: "alice", Category: "chat", ContentType: "image/png",
		CreatedAt: time.Unix(0, e.clock.Load()).UTC(), Status: false}
	if m != want {
		t.Fatalf("meta %+v, want %+v", m, want)
	}
}
