package push

import (
	"context"
	"log/slog"
)

// NewLogSender returns a Sender that logs each push it would send and
// reports success (the development provider: `vartalap serve
// --push-provider log`, the seed's "mock"). It logs a short token prefix and
// the payload's size, not the message itself. log nil means discard.
func NewLogSender(log *slog.Logger) Sender {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return logSender{log: log}
}

type logSender struct{ log *slog.Logger }

// tokenPrefixLen is how much of a token LogSender logs.
const tokenPrefixLen = 8

func (l logSender) Send(ctx context.Context, n Notification) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	tok := n.Token
	if len(tok) > tokenPrefixLen {
		tok = tok[:tokenPrefixLen] + "…"
	}
	l.log.InfoContext(ctx, "push would send",
		"token", tok,
		"collapse_key", n.CollapseKey,
		"ttl", n.TTL,
		"count", n.Data[DataCount],
		"bytes", len(n.Data[DataMessage]))
	return nil
}
