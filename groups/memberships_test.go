package groups

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// logMsg stores a group message from sender on gid's GROUP_LOG subject,
// as the router does, and returns its stream sequence.
func (e *env) logMsg(gid schema.GroupID, sender schema.UserID) uint64 {
	e.t.Helper()
	m := &schema.Message{Version: 3.0, ID: newUUID(), Type: schema.TypeMessage, Channel: schema.ChannelGroup,
		Source: string(sender), Destination: string(gid), Content: []byte(`"hi"`)}
	msg := nats.NewMsg(schema.GroupLog(gid))
	msg.Header.Set(schema.HeaderSender, schema.Token(sender))
	msg.Data = m.MarshalProto()
	ack, err := e.js.PublishMsg(context.Background(), msg)
	if err != nil {
		e.t.Fatalf("store group message: %v", err)
	}
	return ack.Sequence
}

// epochsOf returns u's memberships by group (Service.Memberships).
func (e *env) epochsOf(u schema.UserID) map[schema.GroupID][]schema.Epoch {
	e.t.Helper()
	ms, err := e.svc.Memberships(context.Background(), u)
	if err != nil {
		e.t.Fatalf("memberships of %s: %v", u, err)
	}
	out := make(map[schema.GroupID][]schema.Epoch, len(ms))
	for _, m := range ms {
		if _, dup := out[m.Group]; dup {
			e.t.Fatalf("memberships of %s: group %s twice", u, m.Group)
		}
		out[m.Group] = m.Epochs
	}
	return out
}

// listed reports whether GET /groups/ lists gid for u.
func (e *env) listed(u schema.UserID, gid schema.GroupID) bool {
	e.t.Helper()
	var list []groupJSON
	e.mustDo("GET", "/groups/", u, nil, http.StatusOK, &list)
	return slices.ContainsFunc(list, func(g groupJSON) bool { return g.GroupID == gid })
}

// indexMsg returns the stored index message of u in gid (nil if none).
func (e *env) indexMsg(u schema.UserID, gid schema.GroupID) *jetstream.RawStreamMsg {
	e.t.Helper()
	msgs, err := e.svc.lastMsgs(context.Background(), kvPrefix+indexKey(u, gid))
	if err != nil {
		e.t.Fatal(err)
	}
	if len(msgs) == 0 {
		return nil
	}
	return msgs[0]
}

func epochs(pairs ...uint64) []schema.Epoch {
	var out []schema.Epoch
	for i := 0; i < len(pairs); i += 2 {
		out = append(out, schema.Epoch{Since: pairs[i], Until: pairs[i+1]})
	}
	return out
}

// TestEpochsAfterCreate: every member of a new group has one open epoch
// from 0 (the group's log subject is empty, whatever else GROUP_LOG holds).
func TestEpochsAfterCreate(t *testing.T) {
	e := newEnv(t, Config{})
	other := e.create("zoe", "other", "amy")
	e.logMsg(other, "zoe")
	e.logMsg(other, "amy")
	gid := e.create("alice", "g", "bob")
	for _, u := range []schema.UserID{"alice", "bob"} {
		if got := e.epochsOf(u)[gid]; !reflect.DeepEqual(got, epochs(0, 0)) {
			t.Fatalf("%s: epochs %+v, want [{0 0}]", u, got)
		}
		var v indexValue
		if err := json.Unmarshal(e.indexMsg(u, gid).Data, &v); err != nil {
			t.Fatal(err)
		}
		if v.GroupID != gid || v.AddedOn == 0 || v.RemovedOn != 0 || !reflect.DeepEqual(v.Epochs, epochs(0, 0)) {
			t.Fatalf("%s: index value %+v", u, v)
		}
	}
}

// TestAddSinceLastLogSeq: a member added to a group with messages starts
// after the last of them (not after other groups' messages stored later);
// existing members keep their epochs.
func TestAddSinceLastLogSeq(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob")
	other := e.create("zoe", "other")
	e.logMsg(gid, "alice")
	e.logMsg(gid, "bob")
	last := e.logMsg(gid, "alice")
	e.logMsg(other, "zoe") // a later sequence on another subject
	e.mustDo("POST", "/groups/"+string(gid)+"/members", "bob", map[string]any{"members": []string{"carol", "dave", "alice"}}, http.StatusOK, nil)
	for _, u := range []schema.UserID{"carol", "dave"} {
		got := e.epochsOf(u)[gid]
		if !reflect.DeepEqual(got, epochs(last, 0)) {
			t.Fatalf("%s: epochs %+v, want [{%d 0}]", u, got, last)
		}
		m := schema.Membership{Group: gid, Epochs: got}
		if m.Visible(last) || !m.Visible(last+1) || !m.Current() {
			t.Fatalf("%s: membership %+v sees the history", u, m)
		}
	}
	if got := e.epochsOf("alice")[gid]; !reflect.DeepEqual(got, epochs(0, 0)) {
		t.Fatalf("alice (already a member): epochs %+v", got)
	}
}

// TestRemoveAndReAdd: a removed member's epoch is closed at the log's last
// sequence + 1 (kept as a tombstone that GET /groups does not list but
// Memberships reports); a re-added member gets a second epoch.
func TestRemoveAndReAdd(t *testing.T) {
	e := newEnv(t, Config{Retention: 48 * time.Hour})
	gid := e.create("alice", "g", "bob", "carol")
	base := "/groups/" + string(gid) + "/members"
	e.logMsg(gid, "bob")
	last := e.logMsg(gid, "carol")
	start := time.Now().UnixMilli()
	e.mustDo("DELETE", base, "alice", map[string]any{"member": "bob"}, http.StatusOK, nil)
	e.mustDo("DELETE", base, "carol", nil, http.StatusOK, nil) // leave
	for _, u := range []schema.UserID{"bob", "carol"} {
		if got := e.epochsOf(u)[gid]; !reflect.DeepEqual(got, epochs(0, last+1)) {
			t.Fatalf("%s: epochs %+v, want [{0 %d}]", u, got, last+1)
		}
		if e.listed(u, gid) {
			t.Fatalf("%s still lists the group", u)
		}
		if st, _ := e.do("GET", "/groups/"+string(gid), u, nil); st != http.StatusNotFound {
			t.Fatalf("%s gets the group: %d", u, st)
		}
		m := e.indexMsg(u, gid)
		var v indexValue
		if err := json.Unmarshal(m.Data, &v); err != nil {
			t.Fatal(err)
		}
		if v.RemovedOn < start || v.RemovedOn > time.Now().UnixMilli() {
			t.Fatalf("%s: removedOn %d, want about now", u, v.RemovedOn)
		}
		if ttl := m.Header.Get(jetstream.MsgTTLHeader); ttl != (48 * time.Hour).String() {
			t.Fatalf("%s: tombstone TTL %q, want the retention", u, ttl)
		}
	}

	// Re-added after more messages: the old epoch stays, a new one opens.
	e.logMsg(gid, "alice")
	readd := e.logMsg(gid, "alice")
	e.mustDo("POST", base, "alice", map[string]any{"members": []string{"bob"}}, http.StatusOK, nil)
	got := e.epochsOf("bob")[gid]
	if !reflect.DeepEqual(got, epochs(0, last+1, readd, 0)) {
		t.Fatalf("bob re-added: epochs %+v, want [{0 %d} {%d 0}]", got, last+1, readd)
	}
	m := schema.Membership{Group: gid, Epochs: got}
	if !m.Visible(last) || m.Visible(last+1) || m.Visible(readd) || !m.Visible(readd+1) || !m.Current() {
		t.Fatalf("bob: visibility of %+v", m)
	}
	if !e.listed("bob", gid) {
		t.Fatal("re-added bob does not list the group")
	}
	ttl := e.indexMsg("bob", gid).Header.Get(jetstream.MsgTTLHeader)
	if ttl != "" {
		t.Fatalf("re-added bob's index key still expires (%s)", ttl)
	}
}

// TestEpochCap: at most maxEpochs epochs are kept, the oldest dropped.
func TestEpochCap(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g")
	var want []schema.Epoch
	for range maxEpochs + 2 {
		since := e.logMsg(gid, "alice")
		if _, _, err := e.svc.addMembers(t.Context(), "alice", gid, []schema.UserID{"bob"}); err != nil {
			t.Fatal(err)
		}
		last := e.logMsg(gid, "bob")
		if _, res, err := e.svc.removeMember(t.Context(), "bob", "bob", gid); err != nil || !res.removed {
			t.Fatalf("leave: %v %+v", err, res)
		}
		want = append(want, schema.Epoch{Since: since, Until: last + 1})
	}
	if got := e.epochsOf("bob")[gid]; !reflect.DeepEqual(got, want[len(want)-maxEpochs:]) {
		t.Fatalf("epochs %+v, want the last %d of %+v", got, maxEpochs, want)
	}
}

// TestGroupLogMissing: without GROUP_LOG the start of a new epoch cannot be
// known, so create, add and remove answer 503 and change nothing.
func TestGroupLogMissing(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob")
	if err := e.js.DeleteStream(t.Context(), schema.StreamGroupLog); err != nil {
		t.Fatal(err)
	}
	events := e.inboxTotal()
	base := "/groups/" + string(gid) + "/members"
	steps := []struct {
		name, method, path string
		body               any
	}{
		{"add", "POST", base, map[string]any{"members": []string{"carol"}}},
		{"remove", "DELETE", base, map[string]any{"member": "bob"}},
		{"leave", "DELETE", base, nil},
		{"create", "POST", "/groups/", map[string]any{"name": "new", "members": []string{"carol"}}},
	}
	for _, s := range steps {
		st, body := e.do(s.method, s.path, "alice", s.body)
		var eb api.ErrorBody
		if err := json.Unmarshal(body, &eb); err != nil || st != http.StatusServiceUnavailable || eb.Error != api.CodeUnavailable {
			t.Fatalf("%s: status %d body %s, want 503 unavailable", s.name, st, body)
		}
	}
	if got := roles(t, e.get(gid, "alice")); len(got) != 2 || got["alice"] != RoleAdmin || got["bob"] != RoleUser {
		t.Fatalf("members changed: %v", got)
	}
	if e.indexMsg("carol", gid) != nil || len(e.epochsOf("carol")) != 0 {
		t.Fatal("carol got an index key")
	}
	if got := e.epochsOf("bob")[gid]; !reflect.DeepEqual(got, epochs(0, 0)) {
		t.Fatalf("bob: epochs %+v", got)
	}
	if n := e.inboxTotal(); n != events {
		t.Fatalf("%d events stored", n-events)
	}
}

// TestMembershipsListing: sorted by group, open and closed entries, old
// index values without epochs, deleted groups gone, invalid users refused.
func TestMembershipsListing(t *testing.T) {
	e := newEnv(t, Config{})
	var gids []schema.GroupID
	for range 3 {
		gids = append(gids, e.create("alice", "g", "bob"))
	}
	e.mustDo("DELETE", "/groups/"+string(gids[1])+"/members", "bob", nil, http.StatusOK, nil)
	e.mustDo("DELETE", "/groups/"+string(gids[2]), "alice", nil, http.StatusOK, nil)
	solo := e.create("bob", "solo")
	e.mustDo("DELETE", "/groups/"+string(solo)+"/members", "bob", nil, http.StatusOK, nil) // the group goes
	// An index value written before epochs existed.
	legacy := e.create("carol", "legacy", "bob")
	old, _ := json.Marshal(map[string]any{"groupId": legacy, "addedOn": 1})
	if _, err := e.js.Publish(t.Context(), kvPrefix+indexKey("bob", legacy), old); err != nil {
		t.Fatal(err)
	}
	ms, err := e.svc.Memberships(t.Context(), "bob")
	if err != nil {
		t.Fatal(err)
	}
	want := []schema.Membership{
		{Group: gids[0], Epochs: epochs(0, 0)},
		{Group: gids[1], Epochs: epochs(0, 1)},
		{Group: legacy, Epochs: epochs(0, 0)},
	}
	slices.SortFunc(want, func(a, b schema.Membership) int { return strings.Compare(string(a.Group), string(b.Group)) })
	if !reflect.DeepEqual(ms, want) {
		t.Fatalf("memberships %+v, want %+v", ms, want)
	}
	if !e.listed("bob", legacy) {
		t.Fatal("old index value not listed")
	}
	// Removing the member of an old value closes its one epoch.
	last := e.logMsg(legacy, "carol")
	e.mustDo("DELETE", "/groups/"+string(legacy)+"/members", "bob", nil, http.StatusOK, nil)
	if got := e.epochsOf("bob")[legacy]; !reflect.DeepEqual(got, epochs(0, last+1)) {
		t.Fatalf("old value after removal: %+v", got)
	}

	if ms, err := e.svc.Memberships(t.Context(), "nobody"); err != nil || ms == nil || len(ms) != 0 {
		t.Fatalf("user in no group: %v %v, want an empty slice", ms, err)
	}
	for _, u := range []schema.UserID{"", "a.b", "a*"} {
		if _, err := e.svc.Memberships(t.Context(), u); !errors.Is(err, schema.ErrInvalidID) {
			t.Fatalf("Memberships(%q): %v, want ErrInvalidID", u, err)
		}
	}
}

// TestMembershipsRetention: closed memberships removed longer than
// Config.Retention ago are left out; open ones never are.
func TestMembershipsRetention(t *testing.T) {
	e := newEnv(t, Config{Retention: 30 * 24 * time.Hour})
	t0 := time.Now()
	now := t0
	e.svc.now = func() time.Time { return now } // direct calls only: no other goroutine reads it
	gid := e.create("alice", "g", "bob")
	g2 := e.create("alice", "g2", "bob")
	if _, _, err := e.svc.removeMember(t.Context(), "alice", "bob", gid); err != nil {
		t.Fatal(err)
	}
	now = t0.Add(30*24*time.Hour - time.Minute)
	if got := e.epochsOf("bob"); len(got) != 2 || got[gid] == nil {
		t.Fatalf("within retention: %+v", got)
	}
	now = t0.Add(30*24*time.Hour + time.Minute)
	if got := e.epochsOf("bob"); len(got) != 1 || got[g2] == nil {
		t.Fatalf("after retention: %+v, want only %s", got, g2)
	}
	if got := e.epochsOf("alice"); len(got) != 2 {
		t.Fatalf("open memberships dropped: %+v", got)
	}
}

// TestTombstoneExpires: the server drops a closed index key after the
// retention (per-message TTL), so old memberships do not pile up in the
// user's index.
func TestTombstoneExpires(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the TTL")
	}
	e := newEnv(t, Config{Retention: time.Second})
	gid := e.create("alice", "g", "bob")
	e.mustDo("DELETE", "/groups/"+string(gid)+"/members", "bob", nil, http.StatusOK, nil)
	deadline := time.Now().Add(15 * time.Second)
	for e.indexMsg("bob", gid) != nil {
		if time.Now().After(deadline) {
			t.Fatal("tombstone still stored")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if e.indexMsg("alice", gid) == nil {
		t.Fatal("alice's index key expired too")
	}
}

// TestMembershipsClient: groups.memberships over the micro service.
func TestMembershipsClient(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob")
	last := e.logMsg(gid, "alice")
	e.mustDo("POST", "/groups/"+string(gid)+"/members", "alice", map[string]any{"members": []string{"carol"}}, http.StatusOK, nil)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- e.svc.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	<-e.svc.Started()
	c := NewClient(e.ns.Connect(t), 2*time.Second)

	var got []schema.Membership
	deadline := time.Now().Add(5 * time.Second)
	for { // the micro service subscribes asynchronously
		var err error
		got, err = c.Memberships(t.Context(), "carol")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if want := []schema.Membership{{Group: gid, Epochs: epochs(last, 0)}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("memberships %+v, want %+v", got, want)
	}
	if got, err := c.Memberships(t.Context(), "nobody"); err != nil || got == nil || len(got) != 0 {
		t.Fatalf("user in no group: %v %v", got, err)
	}
	if _, err := c.Memberships(t.Context(), "a.b"); !errors.Is(err, schema.ErrInvalidID) {
		t.Fatalf("invalid user: %v", err)
	}
	// The wire format.
	msg, err := e.nc.Request(subjectMemberships, []byte(`{"user":"carol"}`), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"memberships":[{"group":"` + string(gid) + `","epochs":[{"since":` + jsonUint(last) + `}]}]}`
	if string(msg.Data) != want {
		t.Fatalf("reply %s, want %s", msg.Data, want)
	}
	for _, bad := range []string{"{", `{"user":"a.b"}`, `{}`} {
		msg, err := e.nc.Request(subjectMemberships, []byte(bad), 2*time.Second)
		if err != nil || msg.Header.Get("Nats-Service-Error-Code") != microCodeBadRequest {
			t.Fatalf("request %s: %v %v", bad, err, msg)
		}
	}
}

func jsonUint(n uint64) string {
	b, _ := json.Marshal(n)
	return string(b)
}
