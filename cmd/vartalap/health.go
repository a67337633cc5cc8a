package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// health runs `vartalap health`: it asks a running server whether it can
// serve (GET /readyz) and fails otherwise, for container health checks and
// exec probes in images without curl.
func health(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	fs := flag.NewFlagSet("health", flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := "http://127.0.0.1:8080"
	if addr := getenv("VARTALAP_HTTP_ADDR"); addr != "" {
		def = "http://" + strings.Replace(addr, "0.0.0.0", "127.0.0.1", 1)
	}
	base := fs.String("url", def, "server base URL (default: from VARTALAP_HTTP_ADDR)")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(*base, "/")+"/readyz", nil)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("health: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	fmt.Fprintln(stderr, "ready")
	return nil
}
