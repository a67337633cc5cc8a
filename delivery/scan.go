package delivery

import (
	"context"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/directget"
)

// scan reads the messages of stream on subj with seq >= from in order,
// batch at a time, calling fn for each until fn returns false. It reports
// whether the end of the subject was reached. See directget.Scan: its reply
// channel is sized for one batch, so the catch-up reads of thousands of
// connecting sessions do not each allocate the connection's SubChanLen.
func (s *Service) scan(ctx context.Context, stream, subj string, from uint64, batch int, fn func(*jetstream.RawStreamMsg) bool) (end bool, err error) {
	return directget.Scan(ctx, s.js, stream, subj, from, batch, s.opTimeout, fn)
}
