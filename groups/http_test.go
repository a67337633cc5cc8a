package groups

import (
	"encoding/json"
	"errors"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

func TestNewValidatesConfig(t *testing.T) {
	ns := newEnv(t, Config{})
	tests := []struct {
		name string
		cfg  Config
	}{
		{"no JS", Config{Auth: keyAuth{}}},
		{"no Auth", Config{JS: ns.js}},
		{"negative max members", Config{JS: ns.js, Auth: keyAuth{}, MaxMembers: -1}},
		{"negative replicas", Config{JS: ns.js, Auth: keyAuth{}, Replicas: -1}},
		{"negative retention", Config{JS: ns.js, Auth: keyAuth{}, Retention: -time.Hour}},
		{"retention under a second", Config{JS: ns.js, Auth: keyAuth{}, Retention: time.Millisecond}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.cfg); err == nil {
				t.Fatal("New accepted an invalid config")
			}
		})
	}
	s, err := New(Config{JS: ns.js, Auth: keyAuth{}})
	if err != nil {
		t.Fatal(err)
	}
	if s.maxMembers != DefaultMaxMembers || s.replicas != DefaultReplicas || s.retention != DefaultRetention || s.nc != ns.nc || s.log == nil {
		t.Fatalf("defaults not filled: %+v", s)
	}
}

func TestSetupIsIdempotent(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g1", "bob")
	if err := e.svc.Setup(t.Context()); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	info, err := e.js.Stream(t.Context(), kvStream)
	if err != nil {
		t.Fatal(err)
	}
	cfg := info.CachedInfo().Config
	if !cfg.AllowAtomicPublish || !cfg.AllowDirect || !cfg.AllowMsgTTL || cfg.MaxMsgsPerSubject != 1 {
		t.Fatalf("bucket stream config %+v", cfg)
	}
	if _, err := e.js.KeyValue(t.Context(), schema.BucketGroups); err != nil {
		t.Fatalf("bucket is not a KV bucket: %v", err)
	}
	if got := e.get(gid, "bob"); len(got.Members) != 2 {
		t.Fatalf("group lost after second Setup: %+v", got)
	}
}

// TestRoutes drives every route, with and without /v1.0 and through the
// legacy aliases, in one group's life.
func TestRoutes(t *testing.T) {
	e := newEnv(t, Config{})
	type step struct {
		name, method string
		user         schema.UserID
		body         any
		want         int
		check        func(t *testing.T, body []byte)
	}
	var gid schema.GroupID
	setGID := func(t *testing.T, body []byte) {
		var out map[string]any
		if err := json.Unmarshal(body, &out); err != nil {
			t.Fatal(err)
		}
		if len(out) != 1 {
			t.Fatalf("create reply %s: want only groupId", body)
		}
		gid = schema.GroupID(out["groupId"].(string))
	}
	p := func(format string) func() string {
		return func() string { return strings.ReplaceAll(format, "{id}", string(gid)) }
	}
	listHas := func(n int) func(t *testing.T, body []byte) {
		return func(t *testing.T, body []byte) {
			var gs []groupJSON
			if err := json.Unmarshal(body, &gs); err != nil {
				t.Fatal(err)
			}
			if len(gs) != n {
				t.Fatalf("list %s: want %d groups", body, n)
			}
		}
	}
	status := func(t *testing.T, body []byte) {
		var out map[string]any
		if err := json.Unmarshal(body, &out); err != nil {
			t.Fatal(err)
		}
		if out["status"] != true {
			t.Fatalf("reply %s: want status true", body)
		}
	}
	steps := []struct {
		step
		path func() string
	}{
		{step{name: "create legacy", method: "POST", user: "alice", body: map[string]any{"name": "old", "members": []string{"bob"}}, want: 200, check: setGID}, p("/v1.0/group/create")},
		{step{name: "create", method: "POST", user: "alice", body: map[string]any{"name": "team", "members": []string{"bob"}}, want: 200, check: setGID}, p("/groups/")},
		{step{name: "create no slash v1", method: "POST", user: "alice", body: map[string]any{"name": "t2", "members": []string{}}, want: 200}, p("/v1.0/groups")},
		{step{name: "list", method: "GET", user: "alice", want: 200, check: listHas(3)}, p("/groups/")},
		{step{name: "list no slash", method: "GET", user: "alice", want: 200, check: listHas(3)}, p("/groups")},
		{step{name: "list v1", method: "GET", user: "bob", want: 200, check: listHas(2)}, p("/v1.0/groups/")},
		{step{name: "list legacy", method: "GET", user: "bob", want: 200, check: listHas(2)}, p("/group/get")},
		{step{name: "list legacy v1", method: "GET", user: "carol", want: 200, check: listHas(0)}, p("/v1.0/group/get")},
		{step{name: "get", method: "GET", user: "bob", want: 200}, p("/groups/{id}")},
		{step{name: "get v1 legacy prefix", method: "GET", user: "bob", want: 200}, p("/v1.0/group/{id}")},
		{step{name: "add", method: "POST", user: "bob", body: map[string]any{"members": []string{"carol"}}, want: 200, check: status}, p("/groups/{id}/members")},
		{step{name: "add legacy", method: "POST", user: "bob", body: map[string]any{"members": []string{"dave"}}, want: 200, check: status}, p("/v1.0/group/{id}/add")},
		{step{name: "remove", method: "DELETE", user: "alice", body: map[string]any{"member": "dave"}, want: 200, check: status}, p("/groups/{id}/members")},
		{step{name: "remove legacy", method: "POST", user: "carol", body: map[string]any{}, want: 200, check: status}, p("/v1.0/group/{id}/remove")},
		{step{name: "patch", method: "PATCH", user: "alice", body: map[string]any{"name": "renamed"}, want: 200}, p("/v1.0/groups/{id}")},
		{step{name: "role", method: "PUT", user: "alice", body: map[string]any{"role": "admin"}, want: 200, check: status}, p("/groups/{id}/members/bob/role")},
		{step{name: "role legacy prefix", method: "PUT", user: "bob", body: map[string]any{"role": "user"}, want: 200, check: status}, p("/group/{id}/members/alice/role")},
		{step{name: "delete", method: "DELETE", user: "bob", want: 200, check: status}, p("/v1.0/groups/{id}")},
		{step{name: "get deleted", method: "GET", user: "bob", want: 404}, p("/groups/{id}")},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			st, body := e.do(s.method, s.path(), s.user, s.body)
			if st != s.want {
				t.Fatalf("%s %s: status %d, want %d; body %s", s.method, s.path(), st, s.want, body)
			}
			if s.check != nil {
				s.check(t, body)
			}
		})
	}
}

func TestAuthRequired(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g")
	tests := []struct{ name, method, path, user, key string }{
		{"list no credentials", "GET", "/groups/", "", ""},
		{"create wrong key", "POST", "/groups/", "alice", "nope"},
		{"get wrong key", "GET", "/groups/" + string(gid), "alice", "key-bob"},
		{"legacy add no key", "POST", "/group/" + string(gid) + "/add", "alice", ""},
		{"delete no credentials", "DELETE", "/v1.0/groups/" + string(gid), "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, e.http.URL+tt.path, strings.NewReader(`{}`))
			if tt.user != "" {
				req.Header.Set("user", tt.user)
			}
			if tt.key != "" {
				req.Header.Set("accesskey", tt.key)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %d, want 401", resp.StatusCode)
			}
		})
	}
	if g := e.get(gid, "alice"); g.Name != "g" {
		t.Fatalf("group changed by unauthenticated requests: %+v", g)
	}
}

func TestCreate(t *testing.T) {
	e := newEnv(t, Config{})
	name100 := strings.Repeat("é", 100)
	tests := []struct {
		name     string
		body     any
		want     int
		members  map[schema.UserID]string // on success
		order    []schema.UserID
		errCode  string
		invalid  []string
		wantPic  *string
		wantName string
	}{
		{name: "creator added as admin", body: map[string]any{"name": "a", "members": []string{"bob", "carol"}}, want: 200,
			members: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser}, order: []schema.UserID{"alice", "bob", "carol"}},
		{name: "creator listed stays admin once", body: map[string]any{"name": "a", "members": []string{"bob", "alice"}}, want: 200,
			members: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser}, order: []schema.UserID{"alice", "bob"}},
		{name: "duplicates collapsed", body: map[string]any{"name": "a", "members": []string{"bob", "bob", "carol", "bob"}}, want: 200,
			members: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser}, order: []schema.UserID{"alice", "bob", "carol"}},
		{name: "members missing", body: map[string]any{"name": "solo"}, want: 200,
			members: map[schema.UserID]string{"alice": RoleAdmin}, order: []schema.UserID{"alice"}},
		{name: "picture kept", body: map[string]any{"name": "a", "members": []string{}, "profilePic": "https://x/p.png"}, want: 200,
			members: map[schema.UserID]string{"alice": RoleAdmin}, order: []schema.UserID{"alice"}, wantPic: ptr("https://x/p.png")},
		{name: "100 characters", body: map[string]any{"name": name100, "members": []string{}}, want: 200,
			members: map[schema.UserID]string{"alice": RoleAdmin}, order: []schema.UserID{"alice"}, wantName: name100},
		{name: "invalid usernames named", body: map[string]any{"name": "a", "members": []string{"bob", "a.b", "x y", "server", ""}}, want: 400,
			errCode: codeInvalidUser, invalid: []string{"a.b", "x y", "server", ""}},
		{name: "name missing", body: map[string]any{"members": []string{"bob"}}, want: 400, errCode: api.CodeBadRequest},
		{name: "name blank", body: map[string]any{"name": "  ", "members": []string{}}, want: 400, errCode: api.CodeBadRequest},
		{name: "name too long", body: map[string]any{"name": strings.Repeat("n", 101), "members": []string{}}, want: 400, errCode: api.CodeBadRequest},
		{name: "picture too long", body: map[string]any{"name": "a", "profilePic": strings.Repeat("p", MaxProfilePicLen+1)}, want: 400, errCode: api.CodeBadRequest},
		{name: "too many per request", body: map[string]any{"name": "a", "members": users("m", MaxMembersPerRequest+1)}, want: 400, errCode: api.CodeBadRequest},
		{name: "malformed JSON", body: `{"name":`, want: 400, errCode: api.CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := e.inboxTotal()
			var list []groupJSON
			e.mustDo("GET", "/groups/", "alice", nil, 200, &list)
			st, body := e.do("POST", "/groups/", "alice", tt.body)
			if st != tt.want {
				t.Fatalf("status %d, want %d; body %s", st, tt.want, body)
			}
			if tt.want != 200 {
				var eb invalidUsersBody
				if err := json.Unmarshal(body, &eb); err != nil {
					t.Fatal(err)
				}
				if eb.Status || eb.Error != tt.errCode {
					t.Fatalf("error body %s, want code %s", body, tt.errCode)
				}
				if tt.invalid != nil && !slices.Equal(eb.Invalid, tt.invalid) {
					t.Fatalf("invalid %q, want %q", eb.Invalid, tt.invalid)
				}
				var after []groupJSON
				e.mustDo("GET", "/groups/", "alice", nil, 200, &after)
				if len(after) != len(list) || e.inboxTotal() != before {
					t.Fatal("a rejected create stored something")
				}
				return
			}
			var out struct {
				GroupID schema.GroupID `json:"groupId"`
			}
			if err := json.Unmarshal(body, &out); err != nil {
				t.Fatal(err)
			}
			g := e.get(out.GroupID, "alice")
			if got := roles(t, g); !maps.Equal(got, tt.members) {
				t.Fatalf("members %v, want %v", got, tt.members)
			}
			var order []schema.UserID
			for _, m := range g.Members {
				order = append(order, m.Username)
			}
			if !slices.Equal(order, tt.order) {
				t.Fatalf("member order %v, want %v", order, tt.order)
			}
			if (g.ProfilePic == nil) != (tt.wantPic == nil) || (g.ProfilePic != nil && *g.ProfilePic != *tt.wantPic) {
				t.Fatalf("profilePic %v, want %v", g.ProfilePic, tt.wantPic)
			}
			if tt.wantName != "" && g.Name != tt.wantName {
				t.Fatalf("name %q, want %q", g.Name, tt.wantName)
			}
		})
	}
}

func TestGroupShape(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "shape", "bob")
	for _, path := range []string{"/groups/" + string(gid), "/groups/"} {
		_, body := e.do("GET", path, "bob", nil)
		var raw any
		if err := json.Unmarshal(body, &raw); err != nil {
			t.Fatal(err)
		}
		obj, ok := raw.(map[string]any)
		if list, isList := raw.([]any); isList {
			if len(list) != 1 {
				t.Fatalf("%s: %s", path, body)
			}
			obj, ok = list[0].(map[string]any)
		}
		if !ok {
			t.Fatalf("%s: %s is not a group", path, body)
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if want := []string{"groupId", "members", "name", "profilePic"}; !slices.Equal(keys, want) {
			t.Fatalf("%s: keys %v, want %v", path, keys, want)
		}
		if obj["profilePic"] != nil || obj["groupId"] != string(gid) || obj["name"] != "shape" {
			t.Fatalf("%s: %s", path, body)
		}
		ms := obj["members"].([]any)
		if len(ms) != 2 || len(ms[0].(map[string]any)) != 2 {
			t.Fatalf("%s: members %v, want [{username, role}…]", path, ms)
		}
	}
}

func TestNotFound(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "private", "bob")
	unknown := schema.GroupID(newUUID())
	tests := []struct {
		name, method, path string
		body               any
	}{
		{"get as non-member", "GET", "/groups/" + string(gid), nil},
		{"get unknown", "GET", "/groups/" + string(unknown), nil},
		{"get invalid id", "GET", "/groups/a=b", nil},
		{"add as non-member", "POST", "/groups/" + string(gid) + "/members", map[string]any{"members": []string{"eve"}}},
		{"legacy add as non-member", "POST", "/group/" + string(gid) + "/add", map[string]any{"members": []string{"eve"}}},
		{"remove as non-member", "DELETE", "/groups/" + string(gid) + "/members", map[string]any{"member": "bob"}},
		{"leave as non-member", "POST", "/group/" + string(gid) + "/remove", nil},
		{"patch as non-member", "PATCH", "/groups/" + string(gid), map[string]any{"name": "x"}},
		{"role as non-member", "PUT", "/groups/" + string(gid) + "/members/eve/role", map[string]any{"role": "admin"}},
		{"delete as non-member", "DELETE", "/groups/" + string(gid), nil},
		{"add to unknown", "POST", "/groups/" + string(unknown) + "/members", map[string]any{"members": []string{"eve"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, body := e.do(tt.method, tt.path, "eve", tt.body)
			var eb api.ErrorBody
			if err := json.Unmarshal(body, &eb); err != nil {
				t.Fatalf("body %s: %v", body, err)
			}
			if st != http.StatusNotFound || eb.Status || eb.Error != api.CodeNotFound {
				t.Fatalf("status %d body %s, want 404 not_found", st, body)
			}
		})
	}
	g := e.get(gid, "alice")
	if got := roles(t, g); !maps.Equal(got, map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser}) || g.Name != "private" {
		t.Fatalf("group changed by a non-member: %+v", g)
	}
}

func TestAddMembers(t *testing.T) {
	e := newEnv(t, Config{MaxMembers: 5})
	gid := e.create("alice", "g", "bob")
	type addReply struct {
		Status bool            `json:"status"`
		Added  []schema.UserID `json:"added"`
	}
	tests := []struct {
		name    string
		user    schema.UserID
		members []string
		want    int
		added   []schema.UserID
		code    string
		after   map[schema.UserID]string
	}{
		{name: "user may add", user: "bob", members: []string{"carol", "carol"}, want: 200, added: []schema.UserID{"carol"},
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser}},
		{name: "existing skipped", user: "alice", members: []string{"alice", "bob", "dave"}, want: 200, added: []schema.UserID{"dave"},
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser, "dave": RoleUser}},
		{name: "nothing new", user: "alice", members: []string{"bob"}, want: 200, added: []schema.UserID{},
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser, "dave": RoleUser}},
		{name: "limit exceeded refused whole", user: "alice", members: []string{"erin", "frank"}, want: 409, code: codeMemberLimit,
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser, "dave": RoleUser}},
		{name: "invalid usernames", user: "alice", members: []string{"erin", "bad name"}, want: 400, code: codeInvalidUser,
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser, "dave": RoleUser}},
		{name: "up to the limit", user: "carol", members: []string{"erin"}, want: 200, added: []schema.UserID{"erin"},
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser, "dave": RoleUser, "erin": RoleUser}},
		{name: "full", user: "carol", members: []string{"frank"}, want: 409, code: codeMemberLimit,
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser, "dave": RoleUser, "erin": RoleUser}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, body := e.do("POST", "/groups/"+string(gid)+"/members", tt.user, map[string]any{"members": tt.members})
			if st != tt.want {
				t.Fatalf("status %d, want %d; body %s", st, tt.want, body)
			}
			if tt.want == 200 {
				var out addReply
				if err := json.Unmarshal(body, &out); err != nil {
					t.Fatal(err)
				}
				if !out.Status || !slices.Equal(out.Added, tt.added) {
					t.Fatalf("reply %s, want added %v", body, tt.added)
				}
			} else {
				var eb api.ErrorBody
				if err := json.Unmarshal(body, &eb); err != nil || eb.Error != tt.code || eb.Status {
					t.Fatalf("body %s, want code %s", body, tt.code)
				}
			}
			if got := roles(t, e.get(gid, "alice")); !maps.Equal(got, tt.after) {
				t.Fatalf("members %v, want %v", got, tt.after)
			}
		})
	}
	var list []groupJSON
	e.mustDo("GET", "/groups/", "erin", nil, 200, &list)
	if len(list) != 1 || list[0].GroupID != gid {
		t.Fatalf("erin's groups %+v", list)
	}
}

func TestCreateMemberLimit(t *testing.T) {
	e := newEnv(t, Config{MaxMembers: 3})
	st, body := e.do("POST", "/groups/", "alice", map[string]any{"name": "big", "members": []string{"b", "c", "d"}})
	if st != http.StatusConflict || !strings.Contains(string(body), codeMemberLimit) {
		t.Fatalf("status %d body %s, want 409 member_limit", st, body)
	}
	e.create("alice", "ok", "b", "c")
}

func TestRemoveAndLeave(t *testing.T) {
	e := newEnv(t, Config{})
	tests := []struct {
		name    string
		members []string // created by "alice" (admin)
		prep    func(gid schema.GroupID)
		actor   schema.UserID
		method  string // DELETE …/members or POST legacy …/remove
		body    any
		want    int
		after   map[schema.UserID]string // nil: group gone
	}{
		{name: "leave without body", members: []string{"bob"}, actor: "bob", method: "DELETE", want: 200,
			after: map[schema.UserID]string{"alice": RoleAdmin}},
		{name: "leave with empty object", members: []string{"bob"}, actor: "bob", method: "POST", body: map[string]any{}, want: 200,
			after: map[schema.UserID]string{"alice": RoleAdmin}},
		{name: "leave naming self", members: []string{"bob"}, actor: "bob", method: "DELETE", body: map[string]any{"member": "bob"}, want: 200,
			after: map[schema.UserID]string{"alice": RoleAdmin}},
		{name: "admin removes user", members: []string{"bob", "carol"}, actor: "alice", method: "DELETE", body: map[string]any{"member": "bob"}, want: 200,
			after: map[schema.UserID]string{"alice": RoleAdmin, "carol": RoleUser}},
		{name: "admin removes admin", members: []string{"bob"}, prep: func(gid schema.GroupID) {
			e.mustDo("PUT", "/groups/"+string(gid)+"/members/bob/role", "alice", map[string]any{"role": "admin"}, 200, nil)
		}, actor: "bob", method: "POST", body: map[string]any{"member": "alice"}, want: 200,
			after: map[schema.UserID]string{"bob": RoleAdmin}},
		{name: "user may not remove others", members: []string{"bob", "carol"}, actor: "bob", method: "DELETE", body: map[string]any{"member": "carol"}, want: 403,
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser, "carol": RoleUser}},
		{name: "legacy user may not remove others", members: []string{"bob"}, actor: "bob", method: "POST", body: map[string]any{"member": "alice"}, want: 403,
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser}},
		{name: "removing a non-member succeeds", members: []string{"bob"}, actor: "alice", method: "DELETE", body: map[string]any{"member": "zoe"}, want: 200,
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser}},
		{name: "invalid member", members: []string{"bob"}, actor: "alice", method: "DELETE", body: map[string]any{"member": "a.b"}, want: 400,
			after: map[schema.UserID]string{"alice": RoleAdmin, "bob": RoleUser}},
		// zed joined before amy: the longest-standing member, not the first by name, takes over.
		{name: "last admin leaves: longest-standing becomes admin", members: []string{"zed", "amy"}, actor: "alice", method: "DELETE", want: 200,
			after: map[schema.UserID]string{"zed": RoleAdmin, "amy": RoleUser}},
		{name: "hand-over follows join order after re-join", members: []string{"zed", "amy"}, prep: func(gid schema.GroupID) {
			e.mustDo("DELETE", "/groups/"+string(gid)+"/members", "zed", nil, 200, nil)
			e.mustDo("POST", "/groups/"+string(gid)+"/members", "amy", map[string]any{"members": []string{"zed"}}, 200, nil)
		}, actor: "alice", method: "DELETE", want: 200,
			after: map[schema.UserID]string{"zed": RoleUser, "amy": RoleAdmin}},
		{name: "admin leaves, other admin stays", members: []string{"bob", "carol"}, prep: func(gid schema.GroupID) {
			e.mustDo("PUT", "/groups/"+string(gid)+"/members/carol/role", "alice", map[string]any{"role": "admin"}, 200, nil)
		}, actor: "alice", method: "DELETE", want: 200,
			after: map[schema.UserID]string{"bob": RoleUser, "carol": RoleAdmin}},
		{name: "last member leaves: group deleted", members: []string{}, actor: "alice", method: "DELETE", want: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gid := e.create("alice", tt.name[:10], tt.members...)
			if tt.prep != nil {
				tt.prep(gid)
			}
			path := "/groups/" + string(gid) + "/members"
			if tt.method == "POST" {
				path = "/group/" + string(gid) + "/remove"
			}
			st, body := e.do(tt.method, path, tt.actor, tt.body)
			if st != tt.want {
				t.Fatalf("status %d, want %d; body %s", st, tt.want, body)
			}
			if tt.want == 403 {
				var eb api.ErrorBody
				if err := json.Unmarshal(body, &eb); err != nil || eb.Status || eb.Error != api.CodeForbidden {
					t.Fatalf("body %s, want status false, forbidden", body)
				}
			}
			if tt.after == nil {
				if _, err := e.svc.Members(t.Context(), gid); !errors.Is(err, ErrNotFound) {
					t.Fatalf("group still exists: %v", err)
				}
				return
			}
			var viewer schema.UserID
			for u := range tt.after {
				viewer = u
			}
			if got := roles(t, e.get(gid, viewer)); !maps.Equal(got, tt.after) {
				t.Fatalf("members %v, want %v", got, tt.after)
			}
			// A removed member no longer sees the group.
			if _, stays := tt.after[tt.actor]; !stays && tt.want == 200 {
				if st, _ := e.do("GET", "/groups/"+string(gid), tt.actor, nil); st != 404 {
					t.Fatalf("removed member gets %d, want 404", st)
				}
				var list []groupJSON
				e.mustDo("GET", "/groups/", tt.actor, nil, 200, &list)
				for _, g := range list {
					if g.GroupID == gid {
						t.Fatal("removed member still lists the group")
					}
				}
			}
		})
	}
}

func TestAdminOnly(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob", "carol")
	base := "/groups/" + string(gid)
	tests := []struct {
		name, method, path string
		user               schema.UserID
		body               any
		want               int
		code               string
	}{
		{"user cannot rename", "PATCH", base, "bob", map[string]any{"name": "x"}, 403, api.CodeForbidden},
		{"user cannot promote", "PUT", base + "/members/bob/role", "bob", map[string]any{"role": "admin"}, 403, api.CodeForbidden},
		{"user cannot delete", "DELETE", base, "bob", nil, 403, api.CodeForbidden},
		{"bad role", "PUT", base + "/members/bob/role", "alice", map[string]any{"role": "owner"}, 400, api.CodeBadRequest},
		{"role of non-member", "PUT", base + "/members/zoe/role", "alice", map[string]any{"role": "admin"}, 404, api.CodeNotFound},
		{"role of invalid name", "PUT", base + "/members/a=b/role", "alice", map[string]any{"role": "admin"}, 404, api.CodeNotFound},
		{"cannot demote last admin", "PUT", base + "/members/alice/role", "alice", map[string]any{"role": "user"}, 409, codeLastAdmin},
		{"bad name", "PATCH", base, "alice", map[string]any{"name": ""}, 400, api.CodeBadRequest},
		{"admin renames", "PATCH", base, "alice", map[string]any{"name": "renamed", "profilePic": "p.png"}, 200, ""},
		{"admin promotes", "PUT", base + "/members/bob/role", "alice", map[string]any{"role": "admin"}, 200, ""},
		{"new admin demotes the old", "PUT", base + "/members/alice/role", "bob", map[string]any{"role": "user"}, 200, ""},
		{"demoted admin lost rights", "PATCH", base, "alice", map[string]any{"name": "x"}, 403, api.CodeForbidden},
		{"admin clears picture", "PATCH", base, "bob", map[string]any{"profilePic": ""}, 200, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, body := e.do(tt.method, tt.path, tt.user, tt.body)
			if st != tt.want {
				t.Fatalf("status %d, want %d; body %s", st, tt.want, body)
			}
			if tt.code != "" {
				var eb api.ErrorBody
				if err := json.Unmarshal(body, &eb); err != nil || eb.Status || eb.Error != tt.code {
					t.Fatalf("body %s, want code %s", body, tt.code)
				}
			}
		})
	}
	g := e.get(gid, "carol")
	if g.Name != "renamed" || g.ProfilePic != nil {
		t.Fatalf("group %+v, want name renamed and no picture", g)
	}
	if got := roles(t, g); !maps.Equal(got, map[schema.UserID]string{"alice": RoleUser, "bob": RoleAdmin, "carol": RoleUser}) {
		t.Fatalf("roles %v", got)
	}
	e.mustDo("DELETE", base, "bob", nil, 200, nil)
	for _, u := range []schema.UserID{"alice", "bob", "carol"} {
		var list []groupJSON
		e.mustDo("GET", "/groups/", u, nil, 200, &list)
		if len(list) != 0 {
			t.Fatalf("%s still lists %+v after delete", u, list)
		}
	}
	// The clean-up purged every key of the group.
	for _, f := range []string{kvPrefix + metaKey(gid), membersFilter(gid)} {
		msgs, err := e.svc.lastMsgs(t.Context(), f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			if !isMarker(m.Header) {
				t.Fatalf("key %s survived the delete", m.Subject)
			}
		}
	}
}

func ptr(s string) *string { return &s }
