package main

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The CPU times of /proc/<pid>/stat are found after a command name that
// holds spaces and parentheses.
func TestParseProcStatCPU(t *testing.T) {
	for stat, want := range map[string]float64{
		"42 (vartalap) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 5 0 0": 3,
		"42 (a (b) c) R 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 9 0 5 0 0":     0.1,
		"42 (vartalap) S 1 42 42 0 -1 4194560 100 0 0 0 x 50 0":                    -1,
		"42 (vartalap) S 1 2 3": -1,
		"no parenthesis":        -1,
	} {
		if got := parseProcStatCPU(stat); got != want {
			t.Errorf("parseProcStatCPU(%q) = %v, want %v", stat, got, want)
		}
	}
	if self := procCPUSeconds(os.Getpid()); self < 0 {
		t.Errorf("this process's CPU from /proc: %v", self)
	}
	if got := procCPUSeconds(0); got != -1 {
		t.Errorf("no pid: %v", got)
	}
}

// The load tool drives a real server: every scenario runs briefly and
// accounts for every message it sent.
func TestBenchScenarios(t *testing.T) {
	if testing.Short() {
		t.Skip("load tool test skipped in -short mode")
	}
	// The load tool sends flat out from few sockets; lift the per-socket limit.
	s := startServer(t, t.TempDir(), "--ws-rate", "100000")
	// Progress output some cases must print.
	wantStderr := map[string]string{"group smaller than asked": "warning: groups of 6 members, not 10"}
	cases := []struct {
		name string
		args []string
		want func(r *benchResult) bool
	}{
		{"direct", []string{"direct", "--users", "20", "--duration", "1s"}, func(r *benchResult) bool {
			return r.Delivered > 0 && r.Delivered == r.ServerAcked && r.E2ELatency.N == uint64(r.Delivered)
		}},
		{"direct binary", []string{"direct", "--users", "20", "--duration", "1s", "--format", "binary", "--server-pid", strconv.Itoa(os.Getpid())}, func(r *benchResult) bool {
			// The server runs in this process: its CPU is the test's, read
			// from /proc in 10-ms ticks instead of getrusage's microseconds.
			return r.Delivered > 0 && r.Delivered == r.ServerAcked && r.E2ELatency.N == uint64(r.Delivered) &&
				r.ToolCPUSeconds > 0 && r.ServerCPUSeconds > 0 && math.Abs(r.ServerCPUSeconds-r.ToolCPUSeconds) < 0.1 &&
				r.DiskFsync != nil && r.DiskFsync.N > 10 // the disk probe ran (default: the temp dir) through the 1-s run
		}},
		{"group binary", []string{"group", "--users", "10", "--group-size", "10", "--senders", "2", "--duration", "1s", "--format", "binary"}, func(r *benchResult) bool {
			return r.ServerAcked > 0 && r.Delivered == 9*r.ServerAcked && r.E2ELatency.N == uint64(r.Delivered) &&
				r.ToolCPUSeconds > 0 && r.ServerCPUSeconds == 0 && // no --server-pid
				r.Groups == 1 && r.GroupMembers == 10
		}},
		{"group smaller than asked", []string{"group", "--users", "6", "--group-size", "10", "--senders", "2", "--duration", "1s", "--format", "binary"}, func(r *benchResult) bool {
			// Six sessions make one group of six, and the result says so.
			return r.ServerAcked > 0 && r.Delivered == 5*r.ServerAcked && r.Groups == 1 && r.GroupMembers == 6
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
			if !tc.want(&r) || r.Errors != 0 || r.Undelivered != 0 || r.Duplicates != 0 || r.CalibrationNs <= 0 {
				t.Fatalf("result %+v\nerrors %v", r, r.ErrorSamples)
			}
			if w := wantStderr[tc.name]; !strings.Contains(errb.String(), w) {
				t.Fatalf("progress output lacks %q:\n%s", w, errb.String())
			}
		})
	}
	if err := bench(t.Context(), []string{"direct", "--url", "http://10.1.2.3:8080"}, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Fatal("a non-loopback target was accepted")
	}
}

// A group run whose sessions all fail to connect says so (it dereferenced a
// missing session before).
func TestBenchGroupWithoutSessions(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, `{"code":"unavailable"}`, http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	var errb bytes.Buffer
	err := bench(t.Context(), []string{"group", "--url", srv.URL, "--users", "3", "--group-size", "3", "--duration", "1s"}, &bytes.Buffer{}, &errb)
	if err == nil || !strings.Contains(err.Error(), "sessions connected; a group needs two") {
		t.Fatalf("err = %v, want: sessions connected; a group needs two\n%s", err, errb.String())
	}
}

// The disk probe times write+fsyncs until finished, removes its file, and
// counts the slow ones; a directory it cannot write in is an error.
func TestDiskProbe(t *testing.T) {
	dir := t.TempDir()
	p := startDiskProbe(dir)
	time.Sleep(20 * diskProbeEvery)
	h, err := p.finish()
	if err != nil {
		t.Fatal(err)
	}
	if h.N < 5 || h.Max <= 0 || h.quantile(.5) <= 0 {
		t.Fatalf("%d fsyncs timed (max %v), want at least 5", h.N, h.Max)
	}
	if _, err := p.finish(); err != nil { // a second finish is harmless
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("probe left %d files behind", len(left))
	}
	if _, err := startDiskProbe(filepath.Join(dir, "missing")).finish(); err == nil {
		t.Fatal("a probe in a missing directory reported no error")
	}

	s := newHist()
	for _, d := range []time.Duration{time.Millisecond, 19 * time.Millisecond, 21 * time.Millisecond, 250 * time.Millisecond} {
		s.add(d)
	}
	if n := s.slowCount(slowFsync); n != 2 {
		t.Fatalf("slowCount = %d, want 2 (21 ms and 250 ms over 20 ms)", n)
	}
}
