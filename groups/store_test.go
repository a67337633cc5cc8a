package groups

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/vartalap/vartalap/schema"
)

func TestMembers(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "zed", "bob")
	e.mustDo("POST", "/groups/"+string(gid)+"/members", "bob", map[string]any{"members": []string{"amy"}}, 200, nil)
	deleted := e.create("alice", "gone")
	e.mustDo("DELETE", "/groups/"+string(deleted), "alice", nil, 200, nil)
	tests := []struct {
		name    string
		gid     schema.GroupID
		want    []schema.UserID
		wantErr error
	}{
		{"join order", gid, []schema.UserID{"alice", "zed", "bob", "amy"}, nil},
		{"unknown", schema.GroupID(newUUID()), nil, ErrNotFound},
		{"deleted", deleted, nil, ErrNotFound},
		{"invalid id", "a.b", nil, ErrNotFound},
		{"empty id", "", nil, ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := e.svc.Members(t.Context(), tt.gid)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("members %v, want %v", got, tt.want)
			}
		})
	}
}

// TestConcurrentAdds: 20 members added at once, each by its own request,
// through four services sharing the bucket (so the meta CAS, not only the
// in-process lock, decides); none is lost and join sequences stay unique.
func TestConcurrentAdds(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "race")
	svcs := []*Service{e.svc, e.peer(), e.peer(), e.peer()}
	newcomers := users("n", 20)
	var wg sync.WaitGroup
	errs := make(chan error, len(newcomers))
	for i, u := range newcomers {
		wg.Go(func() {
			_, added, err := svcs[i%len(svcs)].addMembers(t.Context(), "alice", gid, []schema.UserID{schema.UserID(u)})
			if err == nil && len(added) != 1 {
				err = fmt.Errorf("add %s: added %v", u, added)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	g, err := e.svc.load(t.Context(), gid)
	if err != nil {
		t.Fatal(err)
	}
	if len(g.members) != 21 {
		t.Fatalf("%d members, want 21", len(g.members))
	}
	joins := map[uint64]bool{}
	for _, m := range g.members {
		if joins[m.Join] {
			t.Fatalf("join %d used twice", m.Join)
		}
		joins[m.Join] = true
	}
	if g.meta.NextJoin != 22 {
		t.Fatalf("nextJoin %d, want 22", g.meta.NextJoin)
	}
	for _, u := range newcomers {
		var list []groupJSON
		e.mustDo("GET", "/groups/", schema.UserID(u), nil, http.StatusOK, &list)
		if len(list) != 1 || list[0].GroupID != gid {
			t.Fatalf("%s lists %+v", u, list)
		}
	}
}

// TestConcurrentSameUser: many concurrent adds of one user store it once.
func TestConcurrentSameUser(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "dup", "bob")
	var wg sync.WaitGroup
	var mu sync.Mutex
	adds := 0
	for range 10 {
		wg.Go(func() {
			_, added, err := e.svc.addMembers(t.Context(), "bob", gid, []schema.UserID{"carol"})
			if err != nil {
				t.Error(err)
			}
			mu.Lock()
			adds += len(added)
			mu.Unlock()
		})
	}
	wg.Wait()
	if adds != 1 {
		t.Fatalf("carol added %d times", adds)
	}
	got, err := e.svc.Members(t.Context(), gid)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []schema.UserID{"alice", "bob", "carol"}) {
		t.Fatalf("members %v", got)
	}
}

// TestConcurrentAddRemove races adds of new members with removals of
// existing ones, and admins demoting each other.
func TestConcurrentAddRemove(t *testing.T) {
	e := newEnv(t, Config{})
	old := users("o", 10)
	gid := e.create("alice", "churn", old...)
	fresh := users("f", 10)
	peer := e.peer()
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Go(func() {
			if _, _, err := peer.addMembers(t.Context(), "alice", gid, []schema.UserID{schema.UserID(fresh[i])}); err != nil {
				t.Error(err)
			}
		})
		wg.Go(func() {
			// Half are removed by the admin, half leave.
			actor := schema.UserID(old[i])
			if i%2 == 0 {
				actor = "alice"
			}
			if _, res, err := e.svc.removeMember(t.Context(), actor, schema.UserID(old[i]), gid); err != nil || !res.removed {
				t.Errorf("remove %s: %v %+v", old[i], err, res)
			}
		})
	}
	wg.Wait()
	got, err := e.svc.Members(t.Context(), gid)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]schema.UserID{"alice"}, toIDs(fresh)...)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("members %v, want %v", got, want)
	}
	for _, u := range old {
		var list []groupJSON
		e.mustDo("GET", "/groups/", schema.UserID(u), nil, http.StatusOK, &list)
		if len(list) != 0 {
			t.Fatalf("removed %s still lists %+v", u, list)
		}
	}

	// Two admins demote each other at once: one must win, one admin stays.
	if _, _, err := e.svc.setRole(t.Context(), "alice", schema.UserID(fresh[0]), gid, RoleAdmin); err != nil {
		t.Fatal(err)
	}
	results := make([]error, 2)
	pairs := [][2]schema.UserID{{"alice", schema.UserID(fresh[0])}, {schema.UserID(fresh[0]), "alice"}}
	for i, p := range pairs {
		svc := []*Service{e.svc, peer}[i]
		wg.Go(func() { _, _, results[i] = svc.setRole(t.Context(), p[0], p[1], gid, RoleUser) })
	}
	wg.Wait()
	failed := 0
	for _, err := range results {
		switch {
		case err == nil:
		case errors.Is(err, errLastAdmin), errors.Is(err, errForbidden):
			failed++
		default:
			t.Fatal(err)
		}
	}
	g, err := e.svc.load(t.Context(), gid)
	if err != nil {
		t.Fatal(err)
	}
	if failed != 1 || g.admins() != 1 {
		t.Fatalf("%d demotions failed, %d admins left; want 1 and 1", failed, g.admins())
	}

	// All members leave at once: the group ends up deleted, never with
	// members and no admin.
	for i, u := range g.usernames() {
		svc := []*Service{e.svc, peer}[i%2]
		wg.Go(func() {
			if _, _, err := svc.removeMember(t.Context(), u, u, gid); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if _, err := e.svc.Members(t.Context(), gid); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after everyone left: %v", err)
	}
}

func toIDs(ss []string) []schema.UserID {
	out := make([]schema.UserID, len(ss))
	for i, s := range ss {
		out[i] = schema.UserID(s)
	}
	return out
}

// TestLargeGroupPagedLoad: a group with more keys than one multi_last
// request may match is read with paged Direct Gets.
func TestLargeGroupPagedLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("large group")
	}
	e := newEnv(t, Config{MaxMembers: 1200})
	gid := e.create("alice", "huge")
	all := users("m", 1100)
	for chunk := range slices.Chunk(all, MaxMembersPerRequest) {
		if _, _, err := e.svc.addMembers(t.Context(), "alice", gid, toIDs(chunk)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.svc.lastMsgs(t.Context(), kvPrefix+metaKey(gid), membersFilter(gid)); !errors.Is(err, errTooManySubjects) {
		t.Fatalf("multi_last of 1101 members: %v, want errTooManySubjects", err)
	}
	// The index values of more users than one multi_last request may name.
	vals, err := e.svc.indexValues(t.Context(), gid, append(toIDs(all), "absent"))
	if err != nil {
		t.Fatal(err)
	}
	if len(vals) != len(all) || vals["m1099"] == nil || vals["m1099"].closed() || vals["absent"] != nil {
		t.Fatalf("%d index values, want %d", len(vals), len(all))
	}
	got, err := e.svc.Members(t.Context(), gid)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]schema.UserID{"alice"}, toIDs(all)...)
	if !slices.Equal(got, want) {
		t.Fatalf("got %d members, want %d in join order", len(got), len(want))
	}
	// Changes keep working on the paged path.
	if _, res, err := e.svc.removeMember(t.Context(), "alice", "m0500", gid); err != nil || !res.removed {
		t.Fatalf("remove: %v %+v", err, res)
	}
	if got, _ := e.svc.Members(t.Context(), gid); len(got) != 1100 || slices.Contains(got, "m0500") {
		t.Fatalf("after remove: %d members", len(got))
	}
	// Deleted: index keys in the delete's batch and in the clean-up are gone.
	if _, err := e.svc.deleteGroup(t.Context(), "alice", gid); err != nil {
		t.Fatal(err)
	}
	for _, u := range []schema.UserID{"alice", "m0000", "m1099"} {
		if ms, err := e.svc.Memberships(t.Context(), u); err != nil || len(ms) != 0 {
			t.Fatalf("%s after delete: %+v %v", u, ms, err)
		}
	}
	if ms, err := e.svc.Memberships(t.Context(), "m0500"); err != nil || len(ms) != 1 || ms[0].Current() {
		t.Fatalf("m0500 (removed before) after delete: %+v %v", ms, err)
	}
}

// TestRemovedKeysExpire: the purge markers of removed memberships go away,
// so they do not count against multi_last's subject limit for long. The
// removed member's index key stays, as a closed membership (it expires
// after Config.Retention: see TestTombstoneExpires).
func TestRemovedKeysExpire(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for marker TTL")
	}
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob")
	e.mustDo("DELETE", "/groups/"+string(gid)+"/members", "bob", nil, 200, nil)
	deadline := time.Now().Add(markerTTL + 15*time.Second)
	for {
		msgs, err := e.svc.lastMsgs(t.Context(), membersFilter(gid), indexFilter("bob"))
		if err != nil {
			t.Fatal(err)
		}
		if len(msgs) == 2 && msgs[0].Subject == kvPrefix+memberKey(gid, "alice") &&
			msgs[1].Subject == kvPrefix+indexKey("bob", gid) && !isMarker(msgs[1].Header) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("markers still stored: %d subjects", len(msgs))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestRunAndClient(t *testing.T) {
	e := newEnv(t, Config{})
	gid := e.create("alice", "g", "bob")
	c := NewClient(e.ns.Connect(t), 2*time.Second)
	// Before Run nobody answers; this also starts the connection's reply
	// subscription, which lives as long as the connection.
	if _, err := c.Members(t.Context(), gid); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("Members before Run: %v, want a transport error", err)
	}
	ignore := goleak.IgnoreCurrent()

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- e.svc.Run(ctx) }()

	var got []schema.UserID
	deadline := time.Now().Add(5 * time.Second)
	for { // the micro service subscribes asynchronously
		var err error
		got, err = c.Members(t.Context(), gid)
		if err == nil || time.Now().After(deadline) {
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !slices.Equal(got, []schema.UserID{"alice", "bob"}) {
		t.Fatalf("members %v", got)
	}
	tests := []struct {
		name string
		gid  schema.GroupID
	}{
		{"unknown", schema.GroupID(newUUID())},
		{"invalid", "a.b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := c.Members(t.Context(), tt.gid); !errors.Is(err, ErrNotFound) {
				t.Fatalf("err %v, want ErrNotFound", err)
			}
		})
	}
	// A malformed request gets a micro error, not a crash.
	msg, err := e.nc.Request(subjectMembers, []byte("{"), 2*time.Second)
	if err != nil || msg.Header.Get("Nats-Service-Error-Code") != microCodeBadRequest {
		t.Fatalf("malformed request: %v %v", err, msg)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	if _, err := c.Members(t.Context(), gid); err == nil {
		t.Fatal("service still answers after Run returned")
	}
	goleak.VerifyNone(t, ignore)
}

func BenchmarkMembers1000(b *testing.B) {
	e := newEnv(b, Config{})
	gid := e.create("alice", "bench")
	for chunk := range slices.Chunk(users("m", 999), MaxMembersPerRequest) {
		if _, _, err := e.svc.addMembers(context.Background(), "alice", gid, toIDs(chunk)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		got, err := e.svc.Members(context.Background(), gid)
		if err != nil || len(got) != 1000 {
			b.Fatalf("%d members, %v", len(got), err)
		}
	}
}

// TestMembersCacheFollowsChanges: the cached member list is never stale,
// also when another process (a peer Service) changes the group.
func TestMembersCacheFollowsChanges(t *testing.T) {
	e := newEnv(t, Config{})
	peer := e.peer()
	gid := e.create("alice", "g", "bob")
	check := func(want ...schema.UserID) {
		t.Helper()
		for range 2 { // the second call is served from the cache
			got, err := e.svc.Members(t.Context(), gid)
			if err != nil || !slices.Equal(got, want) {
				t.Fatalf("members %v, %v; want %v", got, err, want)
			}
		}
	}
	check("alice", "bob")
	if _, _, err := peer.addMembers(t.Context(), "alice", gid, []schema.UserID{"carol"}); err != nil {
		t.Fatal(err)
	}
	check("alice", "bob", "carol")
	e.mustDo("DELETE", "/groups/"+string(gid)+"/members", "alice", map[string]any{"member": "bob"}, 200, nil)
	check("alice", "carol")
	got, _ := e.svc.Members(t.Context(), gid)
	got[0] = "mallory" // callers may not corrupt the cache
	check("alice", "carol")
	e.mustDo("DELETE", "/groups/"+string(gid), "alice", nil, 200, nil)
	if _, err := e.svc.Members(t.Context(), gid); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted group: %v", err)
	}
}
