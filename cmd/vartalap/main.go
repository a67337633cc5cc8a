// Command vartalap is the Vartalap chat server: one binary that runs every
// service (gateway, router, delivery, groups, profile, push) on an embedded
// NATS JetStream server, or any subset of them against an external NATS
// cluster.
//
//	vartalap serve [flags]   run the server (flags: vartalap serve -h)
//	vartalap version         print the version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// After the first signal, a second one exits at once.
		<-ctx.Done()
		stop()
		again := make(chan os.Signal, 1)
		signal.Notify(again, os.Interrupt, syscall.SIGTERM)
		<-again
		fmt.Fprintln(os.Stderr, "vartalap: second signal, exiting now")
		os.Exit(2)
	}()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stderr); err != nil {
		if !errors.Is(err, errUsage) {
			fmt.Fprintln(os.Stderr, "vartalap:", err)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

// run is the whole program behind main, callable from tests.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	if len(args) == 0 {
		usage(stderr)
		return errUsage
	}
	switch args[0] {
	case "serve":
		return serve(ctx, args[1:], getenv, stderr)
	case "bench":
		return bench(ctx, args[1:], os.Stdout, stderr)
	case "health":
		return health(ctx, args[1:], getenv, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stderr, "vartalap", version)
		return nil
	case "help", "-h", "--help":
		usage(stderr)
		return nil
	default:
		fmt.Fprintf(stderr, "vartalap: unknown command %q\n", args[0])
		usage(stderr)
		return errUsage
	}
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage: vartalap <command> [flags]

commands:
  serve     run the chat server (all services on an embedded NATS by default)
  bench     load-test a running server (vartalap bench for the scenarios)
  health    exit 0 if a running server is ready (GET /readyz), 1 otherwise
  version   print the version

Run "vartalap serve -h" for the serve flags. Every flag can also be set with
an environment variable VARTALAP_<FLAG> (e.g. VARTALAP_HTTP_ADDR); a flag wins.
`)
}
