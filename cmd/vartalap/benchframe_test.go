package main

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/vartalap/vartalap/schema"
)

// scanProto reads what schema.UnmarshalProto reads, for the fields the
// load tool uses, and rejects what it rejects as truncated.
func TestScanProto(t *testing.T) {
	msgs := []schema.Message{
		{Version: 3, ID: "bu1-7", Type: schema.TypeMessage, Channel: schema.ChannelGroup, Source: "bu1", Destination: "g1",
			Content: []byte(`{"t":1733580000000000000,"text":"hi"}`), Timestamp: 5, Meta: map[string]string{"k": "v"}},
		{Version: 3, ID: "x", Type: schema.TypeServerAck, Destination: "bu2"},
		{Version: 3, ID: "m9", Type: schema.TypeNotification, Meta: map[string]string{schema.MetaAction: "error", "code": "bad"},
			Content: []byte("oops")},
		{Version: 3, Type: schema.TypeClientAck},
	}
	for i, m := range msgs {
		data := m.MarshalProto()
		want, err := schema.UnmarshalProto(data)
		if err != nil {
			t.Fatal(err)
		}
		got, err := scanProto(data)
		if err != nil {
			t.Fatalf("%d: %v", i, err)
		}
		if got.id != want.ID || got.serverAck != (want.Type == schema.TypeServerAck) ||
			got.error != (want.Action() == "error") || string(got.content) != string(want.Content) ||
			got.t != bodyTime(want.Content) {
			t.Errorf("%d: scanned %+v from %+v", i, got, want)
		}
		for cut := 1; cut < len(data); cut++ {
			if _, err := schema.UnmarshalProto(data[:cut]); err != nil {
				if _, err := scanProto(data[:cut]); err == nil {
					t.Errorf("%d: %d of %d bytes: scanned, UnmarshalProto refused", i, cut, len(data))
				}
			}
		}
	}
}

func TestIDSet(t *testing.T) {
	var s idSet
	ids := []string{"bu1-0", "bu1-1", "bu1-700", "bu2-1", "a-b-3", "plain", "x-", "-5", "y-12345678901"}
	for _, id := range ids {
		if !s.add(id) {
			t.Fatalf("%s: new id taken for a duplicate", id)
		}
	}
	for _, id := range ids {
		if s.add(id) {
			t.Fatalf("%s: duplicate not seen", id)
		}
	}
	for n := range 5000 { // grows
		if id := fmt.Sprintf("bu3-%d", n); !s.add(id) || s.add(id) {
			t.Fatalf("%s", id)
		}
	}
	if s.add("bu1-2") != true {
		t.Fatal("bu1-2 is new")
	}
}

// Senders started together tick at spread-out phases, not in the same
// instant (the load tool's session-4 bug: ten group senders sent
// together every period).
func TestPhasedTickersSpread(t *testing.T) {
	const senders, period = 10, 200 * time.Millisecond
	ticks := make(chan time.Time, senders)
	start := time.Now()
	for range senders {
		go func() {
			tk := phasedTicker(t.Context(), period, nil)
			defer tk.Stop()
			ticks <- <-tk.C // the first tick after the phase
		}()
	}
	var offsets []time.Duration
	for range senders {
		offsets = append(offsets, (<-ticks).Sub(start)%period)
	}
	slices.Sort(offsets)
	// Ten uniform phases all within a tenth of the period: odds ~1e-8.
	if spread := offsets[senders-1] - offsets[0]; spread < period/10 {
		t.Fatalf("ticks within %v of each other (phases %v): senders tick together", spread, offsets)
	}
}
