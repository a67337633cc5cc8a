package main

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

var metricsAddrRe = regexp.MustCompile(`msg="metrics listening" addr=(\S+)`)

// --metrics-addr serves the services' and the process's metrics on a
// listener of its own: after one message, the gateway counted it.
func TestMetricsEndpoint(t *testing.T) {
	s := startServer(t, t.TempDir(), "--metrics-addr", "127.0.0.1:0")
	m := metricsAddrRe.FindStringSubmatch(s.Logs.String())
	if m == nil {
		t.Fatalf("no metrics listening line in the logs")
	}
	url := "http://" + m[1] + "/metrics"

	ka := login(t, s, "alice", "phone")
	kb := login(t, s, "bob", "phone")
	alice := dial(t, s, "alice", ka, false)
	bob := dial(t, s, "bob", kb, true)
	alice.sendJSON("m1", "bob", "hi bob")
	alice.expectServerAck("m1", wait)
	if got := bob.expect(wait); got.ID != "m1" {
		t.Fatalf("bob got %+v", got)
	}
	bob.ack("m1")

	want := []string{
		`vartalap_gateway_messages_total{result="accepted"} 1`,
		`vartalap_gateway_connections 2`,
		`vartalap_delivery_sessions 2`,
		`vartalap_delivery_acks_total 1`,
		`vartalap_router_messages_total{kind="direct"} 1`,
		`vartalap_router_copies_total 1`,
		"process_resident_memory_bytes ",
		"go_goroutines ",
	}
	var body string
	deadline := time.Now().Add(wait)
	for {
		body = scrape(t, url)
		missing := ""
		for _, w := range want {
			if !strings.Contains(body, "\n"+w) {
				missing = w
				break
			}
		}
		if missing == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/metrics lacks %q:\n%s", missing, body)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Only GET /metrics is served there.
	resp, err := http.Get("http://" + m[1] + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET / on the metrics listener: status %d, want 404", resp.StatusCode)
	}
}

func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d, %v", url, resp.StatusCode, err)
	}
	return string(b)
}
