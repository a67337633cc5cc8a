package groups

import (
	"encoding/json"
	"maps"
	"net/http"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// TestEvents runs a group through every change and checks that exactly the
// receivers of seed §7.2.1 (and of the new actions) got one copy of each
// event, in the seed's JSON shape.
func TestEvents(t *testing.T) {
	e := newEnv(t, Config{})
	everyone := []schema.UserID{"alice", "bob", "carol", "dave", "erin"}
	var gid schema.GroupID
	path := func(suffix string) string { return "/groups/" + string(gid) + suffix }

	type want struct {
		action    string
		body      string
		receivers []schema.UserID
	}
	steps := []struct {
		name  string
		actor schema.UserID
		do    func()
		want  []want
	}{
		{"create", "alice", func() { gid = e.create("alice", "team", "bob", "carol") }, []want{{
			"add", `{"added":[{"username":"alice","role":"admin"},{"username":"bob","role":"user"},{"username":"carol","role":"user"}]}`,
			[]schema.UserID{"alice", "bob", "carol"}}}},
		{"add", "bob", func() {
			e.mustDo("POST", path("/members"), "bob", map[string]any{"members": []string{"dave", "carol"}}, 200, nil)
		}, []want{{"add", `{"added":[{"username":"dave","role":"user"}]}`, []schema.UserID{"alice", "bob", "carol", "dave"}}}},
		{"add existing only", "bob", func() {
			e.mustDo("POST", path("/members"), "bob", map[string]any{"members": []string{"carol"}}, 200, nil)
		}, nil},
		{"remove", "alice", func() {
			e.mustDo("DELETE", path("/members"), "alice", map[string]any{"member": "carol"}, 200, nil)
		}, []want{{"remove", `{"removed":["carol"]}`, []schema.UserID{"alice", "bob", "carol", "dave"}}}},
		{"remove non-member", "alice", func() {
			e.mustDo("DELETE", path("/members"), "alice", map[string]any{"member": "carol"}, 200, nil)
		}, nil},
		{"rename and picture", "alice", func() {
			e.mustDo("PATCH", path(""), "alice", map[string]any{"name": "new", "profilePic": "p.png"}, 200, nil)
		}, []want{{"update", `{"name":"new","profilePic":"p.png"}`, []schema.UserID{"alice", "bob", "dave"}}}},
		{"rename unchanged", "alice", func() {
			e.mustDo("PATCH", path(""), "alice", map[string]any{"name": "new"}, 200, nil)
		}, nil},
		{"clear picture", "alice", func() {
			e.mustDo("PATCH", path(""), "alice", map[string]any{"profilePic": ""}, 200, nil)
		}, []want{{"update", `{"profilePic":null}`, []schema.UserID{"alice", "bob", "dave"}}}},
		{"role", "alice", func() {
			e.mustDo("PUT", path("/members/dave/role"), "alice", map[string]any{"role": "admin"}, 200, nil)
		}, []want{{"role", `{"username":"dave","role":"admin"}`, []schema.UserID{"alice", "bob", "dave"}}}},
		{"leave, another admin stays", "alice", func() {
			e.mustDo("POST", "/group/"+string(gid)+"/remove", "alice", nil, 200, nil)
		}, []want{{"remove", `{"removed":["alice"]}`, []schema.UserID{"alice", "bob", "dave"}}}},
		{"last admin leaves", "dave", func() {
			e.mustDo("DELETE", path("/members"), "dave", nil, 200, nil)
		}, []want{
			{"remove", `{"removed":["dave"]}`, []schema.UserID{"bob", "dave"}},
			{"role", `{"username":"bob","role":"admin"}`, []schema.UserID{"bob"}},
		}},
		{"add back", "bob", func() {
			e.mustDo("POST", path("/members"), "bob", map[string]any{"members": []string{"erin"}}, 200, nil)
		}, []want{{"add", `{"added":[{"username":"erin","role":"user"}]}`, []schema.UserID{"bob", "erin"}}}},
		{"delete", "bob", func() { e.mustDo("DELETE", path(""), "bob", nil, 200, nil) },
			[]want{{"delete", `{"deleted":true}`, []schema.UserID{"bob", "erin"}}}},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			start := time.Now().UnixMilli()
			s.do()
			end := time.Now().UnixMilli()
			ids := map[string]string{} // action+body → event id, the same for every copy
			for _, u := range everyone {
				var expect []want
				for _, w := range s.want {
					if slices.Contains(w.receivers, u) {
						expect = append(expect, w)
					}
				}
				got := e.events(u)
				if len(got) != len(expect) {
					t.Fatalf("%s got %d events, want %d", u, len(got), len(expect))
				}
				for i, m := range got {
					w := expect[i]
					checkEvent(t, m, s.actor, gid, w.action, w.body, start, end)
					if id, ok := ids[w.action+w.body]; ok && id != m.ID {
						t.Fatalf("%s got event id %s, another receiver %s", u, m.ID, id)
					}
					ids[w.action+w.body] = m.ID
				}
			}
		})
	}
}

// checkEvent compares one stored event with seed §7.2.1.
func checkEvent(t *testing.T, m *schema.Message, actor schema.UserID, gid schema.GroupID, action, body string, start, end int64) {
	t.Helper()
	if m.Version != 3.0 || m.Type != schema.TypeNotification || m.Channel != schema.ChannelIndividual || m.Ephemeral ||
		m.Source != string(actor) || m.Destination != string(gid) || m.ID == "" || m.ServerID != m.ID ||
		m.Timestamp != m.ServerTimestamp || int64(m.Timestamp) < start || int64(m.Timestamp) > end {
		t.Fatalf("event fields %+v", m)
	}
	wantMeta := map[string]string{"chatId": string(gid), "chatid": string(gid), "contentType": "notification", "action": action}
	if !maps.Equal(m.Meta, wantMeta) {
		t.Fatalf("meta %v, want %v", m.Meta, wantMeta)
	}
	var gotRender, wantRender map[string]any
	if err := json.Unmarshal(schema.RenderJSON(m), &gotRender); err != nil {
		t.Fatalf("render %s: %v", schema.RenderJSON(m), err)
	}
	// The seed's rendering (§7.2.1), plus serverTimestamp.
	want, _ := json.Marshal(map[string]any{
		"_v": 2.1, "id": m.ID,
		"head": map[string]any{"type": "INDIVIDUAL", "from": actor, "to": gid, "contentType": "notification", "ephemeral": false,
			"chatId": gid, "chatid": gid, "action": action, "category": "message"},
		"body": json.RawMessage(body),
		"from": actor, "to": gid, "msgId": m.ID, "type": "notification", "chatId": gid, "module": "INDIVIDUAL",
		"action": action, "chatType": "INDIVIDUAL", "serverTimestamp": m.ServerTimestamp,
	})
	if err := json.Unmarshal(want, &wantRender); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(gotRender, wantRender) {
		t.Fatalf("rendered\n %s\nwant\n %s", schema.RenderJSON(m), want)
	}
}

// TestEventsUnavailable: when events cannot be stored the API answers 503,
// although the change itself is committed.
func TestEventsUnavailable(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob")
	if err := e.js.DeleteStream(t.Context(), schema.StreamInbox); err != nil {
		t.Fatal(err)
	}
	st, body := e.do("POST", "/groups/"+string(gid)+"/members", "bob", map[string]any{"members": []string{"carol"}})
	var eb api.ErrorBody
	if err := json.Unmarshal(body, &eb); err != nil {
		t.Fatal(err)
	}
	if st != http.StatusServiceUnavailable || eb.Status || eb.Error != api.CodeUnavailable {
		t.Fatalf("status %d body %s, want 503 unavailable", st, body)
	}
	if got := roles(t, e.get(gid, "carol")); got["carol"] != RoleUser {
		t.Fatalf("change not committed: %v", got)
	}
}

// TestEventsLargeGroup: a change seen by more than one atomic batch of
// receivers reaches every member once.
func TestEventsLargeGroup(t *testing.T) {
	if testing.Short() {
		t.Skip("large group")
	}
	e := newEnv(t, Config{MaxMembers: 1100})
	gid := e.create("alice", "big")
	all := users("m", 1050)
	for chunk := range slices.Chunk(all, MaxMembersPerRequest) {
		e.mustDo("POST", "/groups/"+string(gid)+"/members", "alice", map[string]any{"members": chunk}, 200, nil)
	}
	before := e.inboxTotal()
	e.mustDo("PATCH", "/groups/"+string(gid), "alice", map[string]any{"name": "bigger"}, 200, nil)
	if got := e.inboxTotal() - before; got != 1051 {
		t.Fatalf("rename stored %d events, want 1051", got)
	}
	for _, u := range []schema.UserID{"alice", "m0000", "m0999", "m1049"} {
		evs := e.events(u)
		if len(evs) == 0 || evs[len(evs)-1].Action() != actionUpdate {
			t.Fatalf("%s did not get the rename", u)
		}
	}
}

// TestEventsFullInbox: one receiver whose inbox is full (INBOX discards new
// messages per subject) misses the event; the change succeeds and every
// other receiver gets theirs.
func TestEventsFullInbox(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob")
	st, err := e.js.Stream(t.Context(), schema.StreamInbox)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.MaxMsgsPerSubject = 3
	cfg.Discard = jetstream.DiscardNew
	cfg.DiscardNewPerSubject = true
	if _, err := e.js.UpdateStream(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 3 { // fill carol's inbox
		if _, err := e.js.Publish(t.Context(), schema.UserInbox("carol"), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	e.mustDo("POST", "/groups/"+string(gid)+"/members", "bob", map[string]any{"members": []string{"carol", "dave"}}, 200, nil)
	for _, u := range []schema.UserID{"alice", "bob", "dave"} {
		evs := e.events(u)
		if len(evs) == 0 || evs[len(evs)-1].Action() != "add" {
			t.Fatalf("%s did not get the add event", u)
		}
	}
	if got := roles(t, e.get(gid, "carol")); got["carol"] != RoleUser || got["dave"] != RoleUser {
		t.Fatalf("members %v", got)
	}
}
