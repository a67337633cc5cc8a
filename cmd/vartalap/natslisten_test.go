package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// --nats-listen lets the nats CLI in with the generated credentials (and
// nobody without them).
func TestNATSListenCredentials(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := t.TempDir()
	startServer(t, dir, "--nats-listen", addr)
	env, err := os.ReadFile(filepath.Join(dir, "nats-cli.env"))
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for _, line := range strings.Split(string(env), "\n") {
		if k, v, ok := strings.Cut(strings.TrimPrefix(line, "export "), "="); ok {
			vars[k] = v
		}
	}
	if vars["NATS_URL"] != "nats://"+addr || vars["NATS_USER"] == "" || vars["NATS_PASSWORD"] == "" {
		t.Fatalf("nats-cli.env: %q", env)
	}
	if info, err := os.Stat(filepath.Join(dir, "nats-cli.env")); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("nats-cli.env mode: %v %v", info.Mode(), err)
	}
	nc, err := nats.Connect(vars["NATS_URL"], nats.UserInfo(vars["NATS_USER"], vars["NATS_PASSWORD"]))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if _, err := js.Stream(context.Background(), "INBOX"); err != nil {
		t.Fatalf("INBOX via the listener: %v", err)
	}
	if bad, err := nats.Connect(vars["NATS_URL"], nats.UserInfo(vars["NATS_USER"], "wrong")); err == nil {
		bad.Close()
		t.Fatal("a wrong password was accepted")
	}
}
