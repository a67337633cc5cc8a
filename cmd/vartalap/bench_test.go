package main

import (
	"bytes"
	"encoding/json"
	"testing"
)

// The load tool drives a real server: every scenario runs briefly and
// accounts for every message it sent.
func TestBenchScenarios(t *testing.T) {
	if testing.Short() {
		t.Skip("load tool test skipped in -short mode")
	}
	// The load tool sends flat out from few sockets; lift the per-socket limit.
	s := startServer(t, t.TempDir(), "--ws-rate", "100000")
	cases := []struct {
		name string
		args []string
		want func(r *benchResult) bool
	}{
		{"direct", []string{"direct", "--users", "20", "--duration", "1s"}, func(r *benchResult) bool {
			return r.Delivered > 0 && r.Delivered == r.ServerAcked && r.E2ELatency.N == uint64(r.Delivered)
		}},
		{"direct binary", []string{"direct", "--users", "20", "--duration", "1s", "--format", "binary"}, func(r *benchResult) bool {
			return r.Delivered > 0 && r.Delivered == r.ServerAcked && r.E2ELatency.N == uint64(r.Delivered)
		}},
		{"group binary", []string{"group", "--users", "10", "--group-size", "10", "--senders", "2", "--duration", "1s", "--format", "binary"}, func(r *benchResult) bool {
			return r.ServerAcked > 0 && r.Delivered == 9*r.ServerAcked && r.E2ELatency.N == uint64(r.Delivered)
		}},
		{"direct at a rate", []string{"direct", "--users", "20", "--rate", "100", "--duration", "1s"}, func(r *benchResult) bool {
			return r.Delivered > 20 && r.Delivered == r.ServerAcked
		}},
		{"group", []string{"group", "--users", "10", "--group-size", "10", "--senders", "2", "--duration", "1s"}, func(r *benchResult) bool {
			return r.ServerAcked > 0 && r.Delivered == 9*r.ServerAcked
		}},
		{"sync", []string{"sync", "--backlog", "100", "--conversations", "5"}, func(r *benchResult) bool {
			return r.Delivered == 100 && r.CatchUpSeconds > 0
		}},
		{"reconnect", []string{"reconnect", "--users", "20"}, func(r *benchResult) bool {
			return r.Delivered == 20 && r.Connected == 20
		}},
		{"connect", []string{"connect", "--users", "20", "--duration", "1s"}, func(r *benchResult) bool {
			return r.Connected == 20 && r.Drops == 0
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			args := append(tc.args, "--url", s.URL, "--json")
			if err := bench(t.Context(), args, &out, &errb); err != nil {
				t.Fatalf("bench %v: %v\n%s", args, err, errb.String())
			}
			var r benchResult
			if err := json.Unmarshal(out.Bytes(), &r); err != nil {
				t.Fatalf("output %q: %v", out.String(), err)
			}
			if !tc.want(&r) || r.Errors != 0 || r.Undelivered != 0 || r.Duplicates != 0 {
				t.Fatalf("result %+v\nerrors %v", r, r.ErrorSamples)
			}
		})
	}
	if err := bench(t.Context(), []string{"direct", "--url", "http://10.1.2.3:8080"}, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Fatal("a non-loopback target was accepted")
	}
}
