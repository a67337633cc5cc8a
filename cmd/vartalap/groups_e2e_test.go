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
