package gateway

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"testing/fstest"

	"github.com/vartalap/vartalap/internal/natstest"
)

func TestNewValidates(t *testing.T) {
	ns := natstest.Start(t)
	_, js := ns.JetStream(t)
	cases := []struct {
		name string
		cfg  Config
	}{
		{"no JS", Config{Auth: testAuth{}, Delivery: &memDeliverer{}}},
		{"no auth", Config{JS: js, Delivery: &memDeliverer{}}},
		{"no delivery", Config{JS: js, Auth: testAuth{}}},
		{"negative frame size", Config{JS: js, Auth: testAuth{}, Delivery: &memDeliverer{}, MaxFrameBytes: -1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cfg); err == nil {
				t.Fatal("New accepted an invalid config")
			}
		})
	}
	g, err := New(Config{JS: js, Auth: testAuth{}, Delivery: &memDeliverer{}})
	if err != nil {
		t.Fatal(err)
	}
	c := g.cfg
	if c.MaxFrameBytes != 64<<10 || c.OutboundQueue != 512 || c.PingInterval != DefaultPingInterval ||
		c.WriteTimeout != DefaultWriteTimeout || c.PublishTimeout != DefaultPublishTimeout ||
		c.RatePerSecond != 50 || g.burst != 100 || c.MaxRESTMessages != 100 || g.nc == nil || c.Logger == nil {
		t.Fatalf("defaults not filled: %+v burst %d", c, g.burst)
	}
}

func TestHealthAndStatic(t *testing.T) {
	var notReady atomic.Bool
	static := fstest.MapFS{
		"index.html": {Data: []byte("<h1>vartalap</h1>")},
		"main.js":    {Data: []byte("console.log(1)")},
	}
	e := newEnv(t, withConfig(func(c *Config) {
		c.Static = static
		c.Ready = func(context.Context) error {
			if notReady.Load() {
				return errors.New("stream missing")
			}
			return nil
		}
	}))
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(e.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	cases := []struct {
		name       string
		path       string
		notReady   bool
		wantStatus int
		wantBody   string
	}{
		{"alive", "/alive", false, 200, "OK"},
		{"alive with prefix", "/v1.0/alive", false, 200, "OK"},
		{"healthz", "/healthz", false, 200, `{"status":"ok"}` + "\n"},
		{"ready", "/readyz", false, 200, `{"status":"ready"}` + "\n"},
		{"not ready", "/readyz", true, 503, `{"status":false,"error":"unavailable","message":"not ready"}` + "\n"},
		{"index", "/", false, 200, "<h1>vartalap</h1>"},
		{"asset", "/main.js", false, 200, "console.log(1)"},
		{"missing asset", "/nope.js", false, 404, `{"status":false,"error":"not_found","message":"not found"}` + "\n"},
		{"wss without upgrade", "/wss/", false, 400, `{"status":false,"error":"bad_request","message":"websocket upgrade required"}` + "\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			notReady.Store(tc.notReady)
			status, body := get(tc.path)
			if status != tc.wantStatus || body != tc.wantBody {
				t.Fatalf("GET %s = %d %q, want %d %q", tc.path, status, body, tc.wantStatus, tc.wantBody)
			}
		})
	}
}
