package push

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/schema"
)

const waitTimeout = 15 * time.Second

// fakePresence is an in-memory presence table.
type fakePresence struct {
	mu     sync.Mutex
	online map[schema.UserID][]schema.DeviceID
}

func (p *fakePresence) set(u schema.UserID, devs ...schema.DeviceID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.online == nil {
		p.online = make(map[schema.UserID][]schema.DeviceID)
	}
	p.online[u] = devs
}

func (p *fakePresence) Online(ctx context.Context, u schema.UserID) ([]schema.DeviceID, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.online[u]), nil
}

type removal struct {
	user   schema.UserID
	device schema.DeviceID
	token  string
}

// fakeDevices is an in-memory device table. gate, when set, blocks Devices
// until it is closed; removeErr makes RemoveToken fail without removing.
type fakeDevices struct {
	mu        sync.Mutex
	devs      map[schema.UserID][]Device
	removed   []removal
	removeErr error
	gate      chan struct{}
	calls     int // Devices calls
}

func (d *fakeDevices) set(u schema.UserID, devs ...Device) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.devs == nil {
		d.devs = make(map[schema.UserID][]Device)
	}
	d.devs[u] = devs
}

func (d *fakeDevices) Devices(ctx context.Context, u schema.UserID) ([]Device, error) {
	d.mu.Lock()
	gate := d.gate
	d.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls++
	return slices.Clone(d.devs[u]), nil
}

func (d *fakeDevices) RemoveToken(_ context.Context, u schema.UserID, dev schema.DeviceID, token string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.removed = append(d.removed, removal{u, dev, token})
	if d.removeErr != nil {
		return d.removeErr
	}
	d.devs[u] = slices.DeleteFunc(d.devs[u], func(x Device) bool { return x.ID == dev && x.Token == token })
	return nil
}

func (d *fakeDevices) removals() []removal {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.removed)
}

// call is one Sender.Send call.
type call struct {
	n   Notification
	at  time.Time
	err error
}

// recorder is a Sender that records every call. fn decides the outcome of
// a call (nil fn: success); attempt counts the calls for n.Token from 1.
type recorder struct {
	mu       sync.Mutex
	calls    []call
	attempts map[string]int
	inFlight int
	maxIn    int
	fn       func(ctx context.Context, n Notification, attempt int) error
}

func (r *recorder) Send(ctx context.Context, n Notification) error {
	r.mu.Lock()
	if r.attempts == nil {
		r.attempts = make(map[string]int)
	}
	r.attempts[n.Token]++
	attempt := r.attempts[n.Token]
	r.inFlight++
	r.maxIn = max(r.maxIn, r.inFlight)
	fn := r.fn
	r.mu.Unlock()

	var err error
	if fn != nil {
		err = fn(ctx, n, attempt)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	r.inFlight--
	r.calls = append(r.calls, call{n: n, at: time.Now(), err: err})
	return err
}

// all returns the finished calls.
func (r *recorder) all() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

// sent returns the successful calls.
func (r *recorder) sent() []Notification {
	var out []Notification
	for _, c := range r.all() {
		if c.err == nil {
			out = append(out, c.n)
		}
	}
	return out
}

// sentTo returns the successful calls to token.
func (r *recorder) sentTo(token string) []Notification {
	return slices.DeleteFunc(r.sent(), func(n Notification) bool { return n.Token != token })
}

// callsTo returns all calls to token.
func (r *recorder) callsTo(token string) []call {
	return slices.DeleteFunc(r.all(), func(c call) bool { return c.n.Token != token })
}

func (r *recorder) maxInFlight() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.maxIn
}

// env is a push service on a real embedded JetStream with the INBOX and
// GROUP_LOG streams. e.cfg.Groups is nil (no GROUP_LOG consumer) until a
// test sets it, usually to e.groups.
type env struct {
	srv    *natstest.Server
	js     jetstream.JetStream
	pres   *fakePresence
	devs   *fakeDevices
	snd    *recorder
	groups *fakeGroups
	cfg    Config
}

// newEnv starts JetStream, creates INBOX and GROUP_LOG (as delivery.Setup
// does) and prepares the fakes. It checks for leaked goroutines when the
// test ends.
func newEnv(t *testing.T) *env {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	srv := natstest.Start(t)
	_, js := srv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:     schema.StreamInbox,
		Subjects: []string{schema.SubjectInboxAll},
		Storage:  jetstream.FileStorage,
	})
	if err != nil {
		t.Fatalf("create INBOX: %v", err)
	}
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{
		Name:               schema.StreamGroupLog,
		Subjects:           []string{schema.SubjectGroupLogAll},
		Retention:          jetstream.LimitsPolicy,
		Storage:            jetstream.FileStorage,
		AllowDirect:        true,
		AllowAtomicPublish: true,
		Duplicates:         2 * time.Minute,
		MaxMsgsPerSubject:  100_000,
		Discard:            jetstream.DiscardOld,
		RePublish: &jetstream.RePublish{
			Source:      schema.SubjectGroupLogAll,
			Destination: schema.SubjectDeliverGroupRepub,
		},
	})
	if err != nil {
		t.Fatalf("create GROUP_LOG: %v", err)
	}
	e := &env{srv: srv, js: js, pres: &fakePresence{}, devs: &fakeDevices{}, snd: &recorder{}, groups: &fakeGroups{}}
	e.cfg = Config{
		JS:          js,
		Presence:    e.pres,
		Devices:     e.devs,
		Sender:      e.snd,
		Coalesce:    100 * time.Millisecond,
		Concurrency: 4,
	}
	return e
}

// service builds and sets up a Service from e.cfg.
func (e *env) service(t *testing.T) *Service {
	t.Helper()
	s, err := New(e.cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

// run sets s up and runs it until the returned stop is called (or the test
// ends). stop cancels Run and fails the test if Run does not return nil
// within the deadline.
func (e *env) run(t *testing.T, s *Service) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	if err := s.Setup(ctx); err != nil {
		cancel()
		t.Fatalf("Setup: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(waitTimeout):
				t.Fatalf("Run did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// publish stores m in to's inbox and returns its stream sequence.
func (e *env) publish(t *testing.T, to schema.UserID, m *schema.Message) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	ack, err := e.js.Publish(ctx, schema.UserInbox(to), m.MarshalProto())
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	return ack.Sequence
}

// publishGroup stores m once in group g's GROUP_LOG subject, with the
// sender header as the router writes it, and returns its stream sequence.
func (e *env) publishGroup(t *testing.T, g schema.GroupID, m *schema.Message) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	ack, err := e.js.PublishMsg(ctx, &nats.Msg{
		Subject: schema.GroupLog(g),
		Header: nats.Header{
			schema.HeaderSender: []string{schema.Token(schema.UserID(m.Source))},
			schema.HeaderMsgID:  []string{fmt.Sprintf("g:%s:%s:%s", g, m.Source, m.ID)},
		},
		Data: m.MarshalProto(),
	})
	if err != nil {
		t.Fatalf("publish to group %s: %v", g, err)
	}
	return ack.Sequence
}

// waitAcked waits until the INBOX push consumer acked every message up to
// seq. Acking is the last thing the service does for a message, so
// afterwards every push for it has been made.
func (e *env) waitAcked(t *testing.T, seq uint64) {
	t.Helper()
	e.waitAckedOn(t, schema.StreamInbox, seq)
}

// waitAckedOn is waitAcked for the push consumer on stream.
func (e *env) waitAckedOn(t *testing.T, stream string, seq uint64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("ack of %s seq %d", stream, seq), func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c, err := e.js.Consumer(ctx, stream, ConsumerName)
		if err != nil {
			return false
		}
		info, err := c.Info(ctx)
		return err == nil && info.AckFloor.Stream >= seq && info.NumAckPending == 0
	})
}

func (e *env) consumerInfo(t *testing.T) *jetstream.ConsumerInfo {
	t.Helper()
	return e.consumerInfoOn(t, schema.StreamInbox)
}

// consumerInfoOn is consumerInfo for the push consumer on stream.
func (e *env) consumerInfoOn(t *testing.T, stream string) *jetstream.ConsumerInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	c, err := e.js.Consumer(ctx, stream, ConsumerName)
	if err != nil {
		t.Fatalf("consumer: %v", err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatalf("consumer info: %v", err)
	}
	return info
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var msgCounter int

// chat returns a 1:1 text message from -> to.
func chat(from, to schema.UserID, text string) *schema.Message {
	msgCounter++
	return &schema.Message{
		Version:     2.1,
		ID:          fmt.Sprintf("m%d", msgCounter),
		Type:        schema.TypeMessage,
		Channel:     schema.ChannelIndividual,
		Source:      string(from),
		Destination: string(to),
		Content:     fmt.Appendf(nil, `{"text":%q}`, text),
		Timestamp:   1700000000000,
		Meta:        map[string]string{schema.MetaContentType: "text"},
		ServerID:    fmt.Sprintf("s%d", msgCounter),
	}
}

// groupChat returns a text message from -> group g, as the router stores it
// once in GROUP_LOG.
func groupChat(from schema.UserID, g schema.GroupID, text string) *schema.Message {
	m := chat(from, schema.UserID(g), text)
	m.Channel = schema.ChannelGroup
	return m
}

// errNoGroup is fakeGroups' error for a group it does not know.
var errNoGroup = errors.New("fake groups: no such group")

// fakeGroups is an in-memory member table. Its first fail calls fail with
// errBoom; a group it does not know is errNoGroup (wrapped).
type fakeGroups struct {
	mu      sync.Mutex
	members map[schema.GroupID][]schema.UserID
	fail    int
	count   int // Members calls
}

func (g *fakeGroups) set(gid schema.GroupID, users ...schema.UserID) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.members == nil {
		g.members = make(map[schema.GroupID][]schema.UserID)
	}
	g.members[gid] = users
}

func (g *fakeGroups) Members(ctx context.Context, gid schema.GroupID) ([]schema.UserID, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.count++
	if g.count <= g.fail {
		return nil, errBoom
	}
	users, ok := g.members[gid]
	if !ok {
		return nil, fmt.Errorf("members of %s: %w", gid, errNoGroup)
	}
	return slices.Clone(users), nil
}

func (g *fakeGroups) calls() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.count
}

// rendered is the data.message expected for m: the rendering of m as it
// comes back from the stream.
func rendered(t *testing.T, m *schema.Message) string {
	t.Helper()
	back, err := schema.UnmarshalProto(m.MarshalProto())
	if err != nil {
		t.Fatalf("round trip: %v", err)
	}
	return string(schema.RenderJSON(back))
}

var errBoom = errors.New("boom")
