package gateway

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/time/rate"

	"github.com/vartalap/vartalap/schema"
)

// The gate stays open while the node keeps up; on overload it limits to a
// quarter of the rate it admitted, halves the limit at most every gateCut
// down to gateFloor, grows it again once the overload is over and opens
// after gateCalm without one.
func TestFanoutGateControl(t *testing.T) {
	m, err := newMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	over := false
	f := newFanoutGate(func() bool { return over }, time.Second, m)
	now := time.Now()
	step := func(admitted int) {
		t.Helper()
		f.admitted = admitted
		now = now.Add(gateTick)
		f.control(now, gateTick)
	}
	limit := func() float64 {
		if f.lim.Limit() == rate.Inf {
			return 0
		}
		return float64(f.lim.Limit())
	}
	f.checked = now
	for range 10 {
		step(100) // 1,000 group messages/s
	}
	if limit() != 0 || testutil.ToFloat64(m.fanoutLimit) != 0 {
		t.Fatalf("limit %v while the node keeps up", limit())
	}
	over = true
	step(100)
	first := limit()
	if first < 200 || first > 260 { // the admitted rate is smoothed: about 950/s here
		t.Fatalf("first limit %v, want about a quarter of 1,000/s", first)
	}
	if got := testutil.ToFloat64(m.fanoutLimit); got != limit() {
		t.Fatalf("gauge %v, limit %v", got, limit())
	}
	step(25)
	if got := limit(); got != first {
		t.Fatalf("limit %v lowered again within gateCut (was %v)", got, first)
	}
	for range 4 {
		step(25)
	}
	if got := limit(); got != first/2 {
		t.Fatalf("limit %v after gateCut more of overload, want %v", got, first/2)
	}
	for range 100 {
		step(1)
	}
	if got := limit(); got != gateFloor {
		t.Fatalf("limit %v after a long overload, want the floor %v", got, gateFloor)
	}
	over = false
	step(1)
	if got := limit(); got <= gateFloor {
		t.Fatalf("limit %v did not grow after the overload", got)
	}
	for range int(gateCalm/gateTick) - 2 {
		step(1)
	}
	if limit() == 0 {
		t.Fatal("opened before gateCalm without overload")
	}
	step(1)
	step(1)
	if limit() != 0 || testutil.ToFloat64(m.fanoutLimit) != 0 {
		t.Fatalf("limit %v after gateCalm without overload, want open", limit())
	}
}

// While delivery falls behind, group messages pass the gate at its limit:
// one over its turn by more than FanoutPause is refused with rate_limited
// naming it, and one-to-one messages are not held. The connection stays.
func TestGroupMessagesGatedWhileOverloaded(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.FanoutPause = time.Millisecond }))
	ws := e.dial(t, "ack=true", nil)
	writeText(t, ws, groupJSON("g1"))
	if typ, data := read(t, ws); parseAck(t, typ, data).ID != "g1" {
		t.Fatalf("no ack for g1: %s", data)
	}
	e.del.overloaded.Store(true)
	time.Sleep(gateTick + 10*time.Millisecond) // the gate looks again after gateTick
	// The first message after the overload takes the gate's one token
	// (the floor: 5/s); the next would wait 200 ms.
	writeText(t, ws, groupJSON("g2"))
	writeText(t, ws, groupJSON("g3"))
	writeText(t, ws, chatJSON("d1", "bob"))
	acked, refused := map[string]bool{}, map[string]string{}
	for range 3 {
		typ, data := read(t, ws)
		var v struct {
			ID   string `json:"id"`
			Head struct {
				ContentType string `json:"contentType"`
			} `json:"head"`
		}
		if json.Unmarshal(data, &v) == nil && v.Head.ContentType == "SERVER_ACK" {
			acked[v.ID] = true
			continue
		}
		n := parseNotice(t, typ, data)
		refused[n.id] = n.code
	}
	if !acked["g2"] || !acked["d1"] || refused["g3"] != schema.CodeRateLimited {
		t.Fatalf("acked %v, refused %v; want g2 and d1 acked, g3 rate_limited", acked, refused)
	}
	if got := testutil.ToFloat64(e.g.metrics.fanoutLimit); got != gateFloor {
		t.Fatalf("gate limit %v, want %v", got, gateFloor)
	}
	if got := e.streamMsgs(t); got != 3 {
		t.Fatalf("CHAT_IN has %d messages, want 3 (g1, g2, d1)", got)
	}
}

func groupJSON(id string) string {
	return `{"_v":2.1,"id":"` + id + `","head":{"type":"GROUP","to":"0f8fad5b-d9cb-469f-a165-70867728950e","contentType":"text","action":"message"},"body":{"text":"hi"}}`
}

// POST /messages passes group entries through the same gate: one over its
// turn is refused with rate_limited in the entry's error; the others are
// stored.
func TestRESTGroupMessagesGatedWhileOverloaded(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.FanoutPause = time.Millisecond }))
	e.del.overloaded.Store(true)
	status, body := e.post(t, "/messages?ack=true", credHeader("alice", "ka"),
		jsonArray(groupJSON("g1"), groupJSON("g2"), chatJSON("d1", "bob")))
	if status != http.StatusCreated {
		t.Fatalf("status %d: %s", status, body)
	}
	var resp restResponse
	if err := json.Unmarshal(body, &resp); err != nil {
		t.Fatal(err)
	}
	if len(resp.Errors) != 1 || resp.Errors[0].ID != "g2" || resp.Errors[0].Code != schema.CodeRateLimited || len(resp.Acks) != 2 {
		t.Fatalf("want g1 and d1 acked, g2 rate_limited: %s", body)
	}
	if got := e.streamMsgs(t); got != 2 {
		t.Fatalf("CHAT_IN has %d messages, want 2", got)
	}
}
