package main

import (
	"encoding/json"
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

// The load tool reads the server's memory and CPU from its metrics endpoint
// when it has no process id (a server in another container or user).
func TestBenchReadsServerMemoryFromMetrics(t *testing.T) {
	s := startServer(t, t.TempDir(), "--metrics-addr", "127.0.0.1:0", "--ws-rate", "100000")
	m := metricsAddrRe.FindStringSubmatch(s.Logs.String())
	if m == nil {
		t.Fatalf("no metrics listening line in the logs")
	}
	url := "http://" + m[1] + "/metrics"
	if kib := metricsRSSKiB(url); kib < 1024 {
		t.Fatalf("server memory %d KiB from %s", kib, url)
	}
	if kib := metricsRSSKiB("http://" + m[1] + "/nothing"); kib != 0 {
		t.Fatalf("memory %d KiB from a URL without metrics", kib)
	}
	var out, errb strings.Builder
	if err := bench(t.Context(), []string{"connect", "--users", "10", "--duration", "1s", "--url", s.URL, "--server-metrics", url, "--json"}, &out, &errb); err != nil {
		t.Fatalf("bench: %v\n%s", err, errb.String())
	}
	if !strings.Contains(out.String(), `"rss_before_kib":`) || !strings.Contains(out.String(), `"rss_after_kib":`) {
		t.Fatalf("no server memory in the result: %s", out.String())
	}
	out.Reset()
	if err := bench(t.Context(), []string{"direct", "--users", "10", "--rate", "200", "--duration", "1s", "--url", s.URL, "--server-metrics", url, "--json"}, &out, &errb); err != nil {
		t.Fatalf("bench: %v\n%s", err, errb.String())
	}
	var r benchResult
	if err := json.Unmarshal([]byte(out.String()), &r); err != nil || r.ServerCPUSeconds <= 0 {
		t.Fatalf("no server CPU in the result (%v): %s", err, out.String())
	}
	if _, err := parseBench([]string{"connect", "--server-metrics", "http://10.0.0.1:9090/metrics"}, io.Discard); err == nil {
		t.Fatal("a non-loopback metrics URL was accepted")
	}
}
