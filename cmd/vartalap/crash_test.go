package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/vartalap/vartalap/schema"
)

// childEnv marks a re-executed test binary that must act as the server.
const childEnv = "VARTALAP_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "serve" {
		// The server as a separate process, so that kill -9 takes the
		// embedded NATS down with it, exactly like the real binary.
		err := run(context.Background(), []string{"serve"}, os.Getenv, os.Stderr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

var listenRe = regexp.MustCompile(`listening addr=(\S+)`)

// child is the server running as a child process.
type child struct {
	cmd *exec.Cmd
	url string
}

func startChild(t *testing.T, dataDir string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=serve",
		"VARTALAP_DATA_DIR="+dataDir, "VARTALAP_HTTP_ADDR=127.0.0.1:0", "VARTALAP_LOG_LEVEL=info")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		sent := false
		for sc.Scan() {
			if !sent {
				if m := listenRe.FindStringSubmatch(sc.Text()); m != nil {
					found <- "http://" + m[1]
					sent = true
				}
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	select {
	case u := <-found:
		return &child{cmd: cmd, url: u}
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("child server did not start")
		return nil
	}
}

func (c *child) kill9() {
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	_ = c.cmd.Wait()
}

func (c *child) stop() {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		c.kill9()
	}
}

// TestCrashLosesNoAckedMessage kills the server with SIGKILL several times
// while a client sends with ack=true, restarts it on the same data dir, and
// checks that every message that got a SERVER_ACK reaches the recipient.
func TestCrashLosesNoAckedMessage(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test skipped in -short mode")
	}
	dir := t.TempDir()
	srv := startChild(t, dir)
	s := &testServer{URL: srv.url}
	ka := login(t, s, "alice", "d1")
	kb := login(t, s, "bob", "d1")

	var (
		mu    sync.Mutex
		url   = srv.url
		acked = map[string]bool{}
		sent  int
	)
	ctx, cancel := context.WithCancel(context.Background())
	// Several senders (alice on several devices), each keeping a window
	// of messages in flight, so kills land in the middle of busy batches.
	const senders, window = 4, 32
	senderKeys := []string{ka}
	for d := 2; d <= senders; d++ {
		senderKeys = append(senderKeys, login(t, s, "alice", fmt.Sprintf("d%d", d)))
	}
	var senderWG sync.WaitGroup
	for si, key := range senderKeys {
		senderWG.Add(1)
		go func() {
			defer senderWG.Done()
			n := 0
			for ctx.Err() == nil {
				mu.Lock()
				u := url
				mu.Unlock()
				c, err := tryDial(&testServer{URL: u}, "alice", key, false)
				if err != nil {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				for ctx.Err() == nil {
					ids := make([]string, 0, window)
					for range window {
						id := fmt.Sprintf("s%d-%06d", si, n)
						n++
						msg := fmt.Sprintf(`{"_v":2.1,"id":%q,"head":{"type":"INDIVIDUAL","to":"bob","contentType":"text"},"body":{"text":"crash"}}`, id)
						if err := c.conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
							break
						}
						ids = append(ids, id)
					}
					mu.Lock()
					sent += len(ids)
					mu.Unlock()
					got := waitAcks(c, ids, 3*time.Second)
					mu.Lock()
					for _, id := range got {
						acked[id] = true
					}
					mu.Unlock()
					if len(got) < len(ids) {
						break // connection lost mid-window
					}
				}
				c.Close()
			}
		}()
	}
	senderDone := make(chan struct{})
	go func() { senderWG.Wait(); close(senderDone) }()

	const kills = 10
	for k := range kills {
		time.Sleep(time.Duration(400+rand.IntN(800)) * time.Millisecond)
		srv.kill9()
		srv = startChild(t, dir)
		mu.Lock()
		url = srv.url
		mu.Unlock()
		t.Logf("kill %d: restarted at %s", k+1, srv.url)
	}
	time.Sleep(500 * time.Millisecond)
	cancel()
	<-senderDone

	// Drain bob's inbox.
	bob, err := tryDial(&testServer{URL: srv.url}, "bob", kb, true)
	if err != nil {
		t.Fatal(err)
	}
	bob.t = t
	received := map[string]int{}
	missing := func() int {
		n := 0
		for id := range acked {
			if received[id] == 0 {
				n++
			}
		}
		return n
	}
	// Read until every acked message arrived (a batch the router held at
	// the moment of a kill comes back after the consumer's ack wait), or
	// until nothing more arrives for a while after a deadline.
	deadline := time.Now().Add(60 * time.Second)
	for missing() > 0 || time.Now().Before(deadline.Add(-57*time.Second)) {
		if time.Now().After(deadline) {
			break
		}
		m, ok := bob.next(2 * time.Second)
		if !ok {
			continue
		}
		if m.Type == schema.TypeServerAck {
			continue
		}
		received[m.ID]++
		bob.ack(m.ID)
	}
	bob.Close()
	srv.stop()

	mu.Lock()
	defer mu.Unlock()
	var lost []string
	dups := 0
	for id := range acked {
		if received[id] == 0 {
			lost = append(lost, id)
		}
	}
	for _, n := range received {
		if n > 1 {
			dups += n - 1
		}
	}
	t.Logf("crash test: %d kill -9, %d sent, %d server-acked, %d received (distinct), %d duplicates, %d lost",
		kills, sent, len(acked), len(received), dups, len(lost))
	if len(acked) == 0 {
		t.Fatal("no message was acked; the test proved nothing")
	}
	if len(lost) > 0 {
		t.Fatalf("%d acknowledged messages lost, e.g. %s", len(lost), strings.Join(lost[:min(5, len(lost))], ","))
	}
}

// waitAcks waits up to d for the SERVER_ACKs of ids on c and returns the
// ids acknowledged.
func waitAcks(c *client, ids []string, d time.Duration) []string {
	want := make(map[string]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	var got []string
	deadline := time.After(d)
	for len(got) < len(ids) {
		select {
		case f := <-c.in:
			if f.binary {
				continue
			}
			m, err := decodeRendered(f.data)
			if err == nil && m.Type == schema.TypeServerAck && want[m.ID] {
				delete(want, m.ID)
				got = append(got, m.ID)
			}
		case <-c.done:
			return got
		case <-deadline:
			return got
		}
	}
	return got
}
