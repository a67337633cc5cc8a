package groups

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

// keyAuth accepts the access key "key-<user>" for every valid user.
type keyAuth struct{}

func (keyAuth) Authenticate(_ context.Context, user, key string) (api.Identity, error) {
	if !schema.UserID(user).Valid() || key != "key-"+user {
		return api.Identity{}, api.ErrUnauthenticated
	}
	return api.Identity{User: schema.UserID(user), Device: schema.DefaultDevice}, nil
}

type env struct {
	t    testing.TB
	ns   *natstest.Server
	nc   *nats.Conn
	js   jetstream.JetStream
	svc  *Service
	http *httptest.Server
	seen map[schema.UserID]uint64 // last INBOX sequence read per user
}

// groupLogConfig is GROUP_LOG as the delivery package creates it.
func groupLogConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:               schema.StreamGroupLog,
		Subjects:           []string{schema.SubjectGroupLogAll},
		Retention:          jetstream.LimitsPolicy,
		Storage:            jetstream.FileStorage,
		AllowDirect:        true,
		AllowAtomicPublish: true,
		Duplicates:         2 * time.Minute,
		MaxMsgsPerSubject:  100000,
		Discard:            jetstream.DiscardOld,
		RePublish: &jetstream.RePublish{
			Source:      schema.SubjectGroupLogAll,
			Destination: schema.SubjectDeliverGroupRepub,
		},
	}
}

// newEnv starts JetStream, INBOX and GROUP_LOG streams like the delivery
// package's, the service (Setup done) and an HTTP server with chi and api.StripVersion.
func newEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	ns := natstest.Start(t)
	nc, js := ns.JetStream(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:               schema.StreamInbox,
		Subjects:           []string{schema.SubjectInboxAll},
		Storage:            jetstream.FileStorage,
		AllowAtomicPublish: true,
		AllowDirect:        true,
		Duplicates:         2 * time.Minute,
	}); err != nil {
		t.Fatalf("create INBOX: %v", err)
	}
	if _, err := js.CreateStream(ctx, groupLogConfig()); err != nil {
		t.Fatalf("create %s: %v", schema.StreamGroupLog, err)
	}
	cfg.JS = js
	if cfg.Auth == nil {
		cfg.Auth = keyAuth{}
	}
	svc, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := svc.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	r := chi.NewRouter()
	svc.Routes(r)
	hs := httptest.NewServer(api.StripVersion(r))
	t.Cleanup(hs.Close)
	return &env{t: t, ns: ns, nc: nc, js: js, svc: svc, http: hs, seen: map[schema.UserID]uint64{}}
}

// peer returns another Service on its own connection, like a second
// process sharing the bucket.
func (e *env) peer() *Service {
	e.t.Helper()
	_, js := e.ns.JetStream(e.t)
	svc, err := New(Config{JS: js, Auth: keyAuth{}, MaxMembers: e.svc.maxMembers})
	if err != nil {
		e.t.Fatal(err)
	}
	if err := svc.Setup(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	return svc
}

// do sends a request as user (no credentials when user is "") and returns
// the status and body.
func (e *env) do(method, path string, user schema.UserID, body any) (int, []byte) {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, e.http.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if user != "" {
		req.Header.Set("user", string(user))
		req.Header.Set("accesskey", "key-"+string(user))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		e.t.Errorf("%s %s: Content-Type %q, want application/json (body %s)", method, path, ct, data)
	}
	return resp.StatusCode, data
}

// mustDo is do that fails unless the status is want, decoding into out.
func (e *env) mustDo(method, path string, user schema.UserID, body any, want int, out any) {
	e.t.Helper()
	st, data := e.do(method, path, user, body)
	if st != want {
		e.t.Fatalf("%s %s as %s: status %d, want %d; body %s", method, path, user, st, want, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			e.t.Fatalf("%s %s: decode %s: %v", method, path, data, err)
		}
	}
}

// create makes a group as creator and returns its id.
func (e *env) create(creator schema.UserID, name string, members ...string) schema.GroupID {
	e.t.Helper()
	if members == nil {
		members = []string{}
	}
	var out struct {
		GroupID schema.GroupID `json:"groupId"`
	}
	e.mustDo("POST", "/groups/", creator, map[string]any{"name": name, "members": members}, http.StatusOK, &out)
	if !out.GroupID.Valid() {
		e.t.Fatalf("create: invalid group id %q", out.GroupID)
	}
	return out.GroupID
}

// get returns the group as seen by user (must be 200).
func (e *env) get(gid schema.GroupID, user schema.UserID) groupJSON {
	e.t.Helper()
	var g groupJSON
	e.mustDo("GET", "/groups/"+string(gid), user, nil, http.StatusOK, &g)
	return g
}

// roles returns username → role of g, failing on duplicates.
func roles(t testing.TB, g groupJSON) map[schema.UserID]string {
	t.Helper()
	out := map[schema.UserID]string{}
	for _, m := range g.Members {
		if _, dup := out[m.Username]; dup {
			t.Fatalf("member %s listed twice in %+v", m.Username, g.Members)
		}
		out[m.Username] = m.Role
	}
	return out
}

// events returns the INBOX messages of u stored since the last call.
func (e *env) events(u schema.UserID) []*schema.Message {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	seq, err := jetstreamext.GetBatch(ctx, e.js, schema.StreamInbox, 1000,
		jetstreamext.GetBatchSubject(schema.UserInbox(u)), jetstreamext.GetBatchSeq(e.seen[u]+1))
	if err != nil {
		e.t.Fatalf("inbox of %s: %v", u, err)
	}
	var out []*schema.Message
	for m, err := range seq {
		if errors.Is(err, jetstreamext.ErrNoMessages) {
			break
		}
		if err != nil {
			e.t.Fatalf("inbox of %s: %v", u, err)
		}
		msg, err := schema.UnmarshalProto(m.Data)
		if err != nil {
			e.t.Fatalf("inbox of %s: decode seq %d: %v", u, m.Sequence, err)
		}
		if want := msg.ID + ":" + schema.Token(u); m.Header.Get(schema.HeaderMsgID) != want {
			e.t.Errorf("inbox of %s: Nats-Msg-Id %q, want %q", u, m.Header.Get(schema.HeaderMsgID), want)
		}
		out = append(out, msg)
		e.seen[u] = m.Sequence
	}
	return out
}

// inboxTotal is the number of messages in INBOX.
func (e *env) inboxTotal() uint64 {
	e.t.Helper()
	st, err := e.js.Stream(context.Background(), schema.StreamInbox)
	if err != nil {
		e.t.Fatal(err)
	}
	info, err := st.Info(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	return info.State.Msgs
}

// users returns n distinct usernames with a prefix.
func users(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%04d", prefix, i)
	}
	return out
}
