package main

import (
	"fmt"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/vartalap/vartalap/schema"
)

// sendGroup sends a v2.1 group message.
func (c *client) sendGroup(id, gid, text string) {
	c.t.Helper()
	msg := fmt.Sprintf(`{"_v":2.1,"id":%q,"head":{"type":"GROUP","to":%q,"contentType":"text","action":"message"},"body":{"text":%q}}`, id, gid, text)
	if err := c.conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// Create a group over HTTP: every member gets the add event; a group
// message reaches every member but the sender, online or offline; a
// non-member's post is refused with an error naming the message; a removed
// member gets nothing sent after its removal.
func TestGroupsEndToEnd(t *testing.T) {
	s := startServer(t, t.TempDir())
	keys := map[string]string{}
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		keys[u] = login(t, s, u, "d1")
	}
	alice := dial(t, s, "alice", keys["alice"], false)
	bob := dial(t, s, "bob", keys["bob"], true)
	dave := dial(t, s, "dave", keys["dave"], false)

	var created struct {
		GroupID string `json:"groupId"`
	}
	if code := call(t, "POST", s.URL+"/v1.0/groups/", authHeaders("alice", keys["alice"]),
		map[string]any{"name": "friends", "members": []string{"bob", "carol"}}, &created); code != 200 || created.GroupID == "" {
		t.Fatalf("create group: %d %+v", code, created)
	}
	gid := created.GroupID
	for _, c := range []*client{alice, bob} {
		ev := c.expect(wait)
		if ev.Action() != "add" || ev.Destination != gid || ev.Source != "alice" {
			t.Fatalf("%s: add event %+v", c.user, ev)
		}
		c.ack(ev.ID)
	}
	dave.expectNothing(200 * time.Millisecond)

	// Legacy list route shows the group with roles.
	var list []struct {
		GroupID string `json:"groupId"`
		Members []struct {
			Username string `json:"username"`
			Role     string `json:"role"`
		} `json:"members"`
	}
	if code := call(t, "GET", s.URL+"/group/get", authHeaders("bob", keys["bob"]), nil, &list); code != 200 || len(list) != 1 || len(list[0].Members) != 3 {
		t.Fatalf("group list: %d %+v", code, list)
	}
	if code := call(t, "GET", s.URL+"/groups/"+gid, authHeaders("dave", keys["dave"]), nil, nil); code != 404 {
		t.Fatalf("non-member group info: %d, want 404", code)
	}

	alice.sendGroup("g1", gid, "hello group")
	alice.expectServerAck("g1", wait)
	m := bob.expect(wait)
	if m.ID != "g1" || m.Destination != gid || m.Source != "alice" || bodyText(m) != "hello group" {
		t.Fatalf("bob got %+v", m)
	}
	bob.ack("g1")
	alice.expectNothing(300 * time.Millisecond) // the sender gets no copy

	// Carol was offline: she gets the add event and the message on connect.
	carol := dial(t, s, "carol", keys["carol"], false)
	if ev := carol.expect(wait); ev.Action() != "add" {
		t.Fatalf("carol: %+v", ev)
	}
	if m := carol.expect(wait); m.ID != "g1" {
		t.Fatalf("carol: %+v", m)
	}

	// Dave is not a member: error notice naming his message, nothing delivered.
	// The SERVER_ACK (stored) and the router's notice (not delivered) may
	// arrive in either order.
	dave.sendGroup("d1", gid, "let me in")
	acked, noticed := false, false
	for !acked || !noticed {
		n, ok := dave.next(wait)
		switch {
		case !ok:
			t.Fatalf("dave: ack %v, notice %v", acked, noticed)
		case n.Type == schema.TypeServerAck && n.ID == "d1" && !acked:
			acked = true
		case n.Action() == "error" && n.ID == "d1" && !noticed:
			noticed = true
		default:
			t.Fatalf("dave: %+v", n)
		}
	}
	bob.expectNothing(300 * time.Millisecond)

	// Alice removes carol: carol gets the remove event and nothing after it.
	if code := call(t, "DELETE", s.URL+"/groups/"+gid+"/members", authHeaders("alice", keys["alice"]), map[string]any{"member": "carol"}, nil); code != 200 {
		t.Fatalf("remove carol: %d", code)
	}
	for _, c := range []*client{carol, alice} {
		if ev := c.expect(wait); ev.Action() != "remove" {
			t.Fatalf("%s: %+v", c.user, ev)
		}
	}
	alice.sendGroup("g2", gid, "after removal")
	alice.expectServerAck("g2", wait)
	for {
		m := bob.expect(wait)
		if m.ID == "g2" {
			break
		}
		bob.ack(m.ID) // the remove event
	}
	carol.expectNothing(500 * time.Millisecond)
}

// Group messages are stored once (GROUP_LOG) and each member sees exactly
// what was sent while it was a member: a connected user added to a group
// gets what follows its add, not what preceded it; a member removed and
// added again while offline gets what was sent in its two memberships and
// not what was sent in between; acked group messages are not delivered
// again after a reconnect or a server restart.
func TestGroupMembershipEpochsEndToEnd(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir)
	keys := map[string]string{}
	for _, u := range []string{"alice", "bob", "carol"} {
		keys[u] = login(t, s, u, "d1")
	}
	alice := dial(t, s, "alice", keys["alice"], false)
	bob := dial(t, s, "bob", keys["bob"], true)
	carol := dial(t, s, "carol", keys["carol"], false)

	var created struct {
		GroupID string `json:"groupId"`
	}
	if code := call(t, "POST", s.URL+"/v1.0/groups/", authHeaders("alice", keys["alice"]),
		map[string]any{"name": "epochs", "members": []string{"bob"}}, &created); code != 200 {
		t.Fatalf("create: %d", code)
	}
	gid := created.GroupID
	members := func(method string, body map[string]any) {
		t.Helper()
		if code := call(t, method, s.URL+"/groups/"+gid+"/members", authHeaders("alice", keys["alice"]), body, nil); code != 200 {
			t.Fatalf("%s members %v: %d", method, body, code)
		}
	}
	// expectIDs reads c's messages (acking each) until it has every id in
	// want, in order, skipping the group events.
	expectIDs := func(c *client, want ...string) {
		t.Helper()
		var got []string
		for len(got) < len(want) {
			m := c.expect(wait)
			c.ack(m.ID)
			if m.Type == schema.TypeNotification {
				continue
			}
			got = append(got, m.ID)
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s got %v, want %v", c.user, got, want)
		}
	}
	send := func(id string) {
		t.Helper()
		alice.sendGroup(id, gid, "text "+id)
		for { // acking the group events alice gets meanwhile
			m, ok := alice.next(wait)
			switch {
			case !ok:
				t.Fatalf("no SERVER_ACK for %s", id)
			case m.Type == schema.TypeServerAck && m.ID == id:
				return
			case m.Type == schema.TypeNotification:
				alice.ack(m.ID)
			case m.Type != schema.TypeServerAck:
				t.Fatalf("alice got %+v", m)
			}
		}
	}

	send("m1")
	expectIDs(bob, "m1")
	members("POST", map[string]any{"members": []string{"carol"}})
	if ev := carol.expect(wait); ev.Action() != "add" {
		t.Fatalf("carol: %+v", ev)
	}
	send("m2")
	expectIDs(bob, "m2")
	expectIDs(carol, "m2") // not m1: sent before she was added
	carol.expectNothing(200 * time.Millisecond)

	// Bob goes offline, is removed and added again; m4 is sent in between.
	// Membership applies when a message is routed (stored in GROUP_LOG),
	// not when its SERVER_ACK is sent: carol's copy shows it was routed
	// before the next change.
	bob.Close()
	send("m3")
	expectIDs(carol, "m3")
	members("DELETE", map[string]any{"member": "bob"})
	send("m4")
	expectIDs(carol, "m4")
	members("POST", map[string]any{"members": []string{"bob"}})
	send("m5")
	expectIDs(carol, "m5")
	bob = dial(t, s, "bob", keys["bob"], true)
	expectIDs(bob, "m3", "m5") // m4 was sent while he was out
	bob.expectNothing(300 * time.Millisecond)
	bob.Close()
	carol.Close()
	alice.Close()

	// A restart changes nothing: acked messages stay acked.
	if err := s.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	s = startServer(t, dir)
	bob = dial(t, s, "bob", keys["bob"], false)
	carol = dial(t, s, "carol", keys["carol"], false)
	alice = dial(t, s, "alice", keys["alice"], false)
	send("m6")
	expectIDs(bob, "m6")
	expectIDs(carol, "m6")
	bob.expectNothing(300 * time.Millisecond)
}
