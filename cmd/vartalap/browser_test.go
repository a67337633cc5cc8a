package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestWebClientInBrowser drives the bundled web client in headless Chromium
// (internal/webclient/e2e/chat.mjs, playwright-core): two users log in,
// chat 1:1 and in a group. .ci/run installs Chromium and the npm package;
// elsewhere the test is skipped when they are missing.
func TestWebClientInBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("browser test skipped in -short mode")
	}
	dir, err := filepath.Abs(filepath.Join("..", "..", "internal", "webclient", "e2e"))
	if err != nil {
		t.Fatal(err)
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node not installed")
	}
	if _, err := os.Stat("/usr/bin/chromium"); err != nil {
		t.Skip("chromium not installed (apt-get install chromium)")
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "playwright-core")); err != nil {
		t.Skip("playwright-core not installed (npm ci in internal/webclient/e2e)")
	}
	s := startServer(t, t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "chat.mjs")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "BASE_URL="+s.URL, "SHOT_DIR="+t.TempDir())
	out, err := cmd.CombinedOutput()
	t.Logf("chat.mjs:\n%s", out)
	if err != nil {
		t.Fatalf("browser test failed: %v", err)
	}
}
