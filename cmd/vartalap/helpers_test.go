package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/vartalap/vartalap/internal/testlog"
	"github.com/vartalap/vartalap/schema"
)

var addrRe = regexp.MustCompile(`msg=listening addr=(\S+)`)

// server is one `vartalap serve` run in this process through run().
type testServer struct {
	URL  string // http://host:port
	Logs *testlog.Buffer
	stop func() error
}

// startServer runs `vartalap serve` with args (port 0 and a data dir are
// added unless given) and waits for its "listening" line.
func startServer(t *testing.T, dataDir string, args ...string) *testServer {
	t.Helper()
	full := []string{"serve", "--http-addr", "127.0.0.1:0", "--data-dir", dataDir, "--log-level", "debug"}
	full = append(full, args...)
	ctx, cancel := context.WithCancel(context.Background())
	logs := &testlog.Buffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, full, func(string) string { return "" }, logs) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if m := addrRe.FindStringSubmatch(logs.String()); m != nil {
			s := &testServer{URL: "http://" + m[1], Logs: logs}
			var once sync.Once
			var stopErr error
			s.stop = func() error {
				once.Do(func() {
					cancel()
					select {
					case stopErr = <-done:
					case <-time.After(30 * time.Second):
						stopErr = fmt.Errorf("server did not stop; logs:\n%s", logs.String())
					}
				})
				return stopErr
			}
			t.Cleanup(func() {
				if err := s.stop(); err != nil {
					t.Errorf("server stop: %v", err)
				}
				if t.Failed() {
					all := logs.String()
					if !testing.Verbose() && len(all) > 16<<10 {
						all = "…" + all[len(all)-16<<10:]
					}
					t.Logf("server logs:\n%s", all)
				}
			})
			return s
		}
		select {
		case err := <-done:
			cancel()
			t.Fatalf("server exited before listening: %v\nlogs:\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("server did not start; logs:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop shuts the server down and returns run's error.
func (s *testServer) Stop() error { return s.stop() }

func (s *testServer) wsURL(query string) string {
	return "ws" + strings.TrimPrefix(s.URL, "http") + "/wss/?" + query
}

// call does an HTTP request and decodes a JSON answer into out (if non-nil).
func call(t *testing.T, method, u string, hdr map[string]string, body any, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, u, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if out != nil && len(raw) > 0 {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: status %d, body %q: %v", method, u, resp.StatusCode, raw, err)
		}
	}
	return resp.StatusCode
}

type loginResp struct {
	Status    bool   `json:"status"`
	Username  string `json:"username"`
	AccessKey string `json:"accesskey"`
	IsNew     bool   `json:"isNew"`
}

// login logs user in on device with the dev provider and returns its key.
func login(t *testing.T, s *testServer, user, device string) string {
	t.Helper()
	var lr loginResp
	code := call(t, "POST", s.URL+"/v1.0/login", nil, map[string]any{
		"username": user, "authToken": "dev-token", "notificationToken": "tok-" + user + "-" + device, "deviceId": device,
	}, &lr)
	if code != 200 || !lr.Status || lr.AccessKey == "" {
		t.Fatalf("login %s/%s: status %d %+v", user, device, code, lr)
	}
	return lr.AccessKey
}

func authHeaders(user, key string) map[string]string {
	return map[string]string{"user": user, "accesskey": key}
}

// client is a WebSocket client of the chat protocol.
type client struct {
	t      *testing.T
	conn   *websocket.Conn
	user   string
	binary bool
	in     chan frame
	done   chan struct{}
	closed chan int // close code seen by the reader
}

type frame struct {
	binary bool
	data   []byte
}

// dial connects user (with key) as a text or binary client with acks on.
func dial(t *testing.T, s *testServer, user, key string, binary bool) *client {
	t.Helper()
	c, err := tryDial(s, user, key, binary)
	if err != nil {
		t.Fatalf("dial %s: %v", user, err)
	}
	c.t = t
	t.Cleanup(c.Close)
	return c
}

func tryDial(s *testServer, user, key string, binary bool) (*client, error) {
	format := "text"
	if binary {
		format = "binary"
	}
	h := http.Header{}
	h.Set("user", user)
	h.Set("accesskey", key)
	conn, resp, err := websocket.DefaultDialer.Dial(s.wsURL("format="+format+"&ack=true"), h)
	if err != nil {
		if resp != nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			return nil, fmt.Errorf("%w (status %d: %s)", err, resp.StatusCode, body)
		}
		return nil, err
	}
	c := &client{conn: conn, user: user, binary: binary, in: make(chan frame, 10000), done: make(chan struct{}), closed: make(chan int, 1)}
	go func() {
		defer close(c.done)
		for {
			mt, data, err := conn.ReadMessage()
			if err != nil {
				code := 0
				if ce, ok := err.(*websocket.CloseError); ok {
					code = ce.Code
				}
				c.closed <- code
				return
			}
			c.in <- frame{binary: mt == websocket.BinaryMessage, data: data}
		}
	}()
	return c, nil
}

func (c *client) Close() {
	_ = c.conn.Close()
	<-c.done
}

// sendJSON sends a v2.1 message to `to`.
func (c *client) sendJSON(id, to, text string) {
	c.t.Helper()
	msg := fmt.Sprintf(`{"_v":2.1,"id":%q,"head":{"type":"INDIVIDUAL","to":%q,"from":%q,"contentType":"text","action":"message","chatid":"c1"},"body":{"text":%q}}`, id, to, c.user, text)
	if err := c.conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// sendProto sends a protobuf MESSAGE to `to`.
func (c *client) sendProto(id, to, text string) {
	c.t.Helper()
	m := &schema.Message{Version: 3, ID: id, Type: schema.TypeMessage, Channel: schema.ChannelIndividual,
		Source: c.user, Destination: to, Content: []byte(fmt.Sprintf(`{"text":%q}`, text))}
	if err := c.conn.WriteMessage(websocket.BinaryMessage, m.MarshalProto()); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// ack sends a CLIENT_ACK for id in this client's format.
func (c *client) ack(id string) {
	c.t.Helper()
	var err error
	if c.binary {
		m := &schema.Message{Version: 3, ID: id, Type: schema.TypeClientAck, Channel: schema.ChannelIndividual, Ephemeral: true, Destination: "server"}
		err = c.conn.WriteMessage(websocket.BinaryMessage, m.MarshalProto())
	} else {
		err = c.conn.WriteMessage(websocket.TextMessage, []byte(fmt.Sprintf(`{"_v":2.1,"id":%q,"head":{"type":"INDIVIDUAL","to":"server","contentType":"CLIENT_ACK"},"body":{}}`, id)))
	}
	if err != nil {
		c.t.Fatalf("ack: %v", err)
	}
}

// next returns the next message frame, decoded, skipping pong.
func (c *client) next(timeout time.Duration) (*schema.Message, bool) {
	c.t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case f := <-c.in:
			if !f.binary && string(f.data) == "pong" {
				continue
			}
			var m *schema.Message
			var err error
			if f.binary {
				m, err = schema.UnmarshalProto(f.data)
			} else {
				m, err = decodeRendered(f.data)
			}
			if err != nil {
				c.t.Fatalf("bad frame %q: %v", f.data, err)
			}
			return m, true
		case <-deadline:
			return nil, false
		}
	}
}

// expect returns the next frame that is not a SERVER_ACK, failing after timeout.
func (c *client) expect(timeout time.Duration) *schema.Message {
	c.t.Helper()
	for {
		m, ok := c.next(timeout)
		if !ok {
			c.t.Fatalf("%s: no message within %v", c.user, timeout)
		}
		if m.Type == schema.TypeServerAck {
			continue
		}
		return m
	}
}

// expectServerAck waits for the SERVER_ACK of id.
func (c *client) expectServerAck(id string, timeout time.Duration) {
	c.t.Helper()
	for {
		m, ok := c.next(timeout)
		if !ok {
			c.t.Fatalf("%s: no SERVER_ACK for %s within %v", c.user, id, timeout)
		}
		if m.Type == schema.TypeServerAck && m.ID == id {
			return
		}
		if m.Type != schema.TypeServerAck {
			c.t.Fatalf("%s: expected SERVER_ACK for %s, got %+v", c.user, id, m)
		}
	}
}

// expectNothing asserts that no message frame arrives within d.
func (c *client) expectNothing(d time.Duration) {
	c.t.Helper()
	if m, ok := c.next(d); ok {
		c.t.Fatalf("%s: unexpected message %+v", c.user, m)
	}
}

// decodeRendered parses the JSON a text client receives back into a Message
// (enough for assertions: id, from, to, type, body).
func decodeRendered(data []byte) (*schema.Message, error) {
	var v struct {
		ID   string `json:"id"`
		Head struct {
			Type        string `json:"type"`
			From        string `json:"from"`
			To          string `json:"to"`
			ContentType string `json:"contentType"`
			Action      string `json:"action"`
			Ephemeral   bool   `json:"ephemeral"`
		} `json:"head"`
		Body json.RawMessage `json:"body"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return nil, err
	}
	m := &schema.Message{ID: v.ID, Source: v.Head.From, Destination: v.Head.To, Content: v.Body, Ephemeral: v.Head.Ephemeral,
		Meta: map[string]string{"action": v.Head.Action, "contentType": v.Head.ContentType}}
	m.Channel, _ = schema.ParseChannel(v.Head.Type)
	if t, ok := schema.ParseType(v.Head.ContentType); ok {
		m.Type = t
	} else {
		m.Type = schema.TypeMessage
	}
	return m, nil
}

// bodyText returns body.text of a delivered message.
func bodyText(m *schema.Message) string {
	var b struct {
		Text string `json:"text"`
	}
	_ = json.Unmarshal(m.Content, &b)
	return b.Text
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
