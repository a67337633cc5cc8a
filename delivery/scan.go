package delivery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Headers and statuses of batched Direct Get responses.
const (
	headerNumPending = "Nats-Num-Pending" // matching messages after this one (as of the request)
	headerStatus     = "Status"
	headerDesc       = "Description"
	statusNoMessages = "404"
	statusEOB        = "204" // end of batch
)

// errNoMessages: no message on the subject at or after the requested seq.
var errNoMessages = errors.New("no messages")

// batchRequest is the batched Direct Get request body.
type batchRequest struct {
	Seq     uint64 `json:"seq"`
	NextFor string `json:"next_by_subj"`
	Batch   int    `json:"batch"`
}

// scan reads the messages of stream on subj with seq >= from in order, batch
// at a time, calling fn for each until fn returns false. It reports whether the
// end of the stream was reached.
//
// It is a batched Direct Get like jetstreamext.GetBatch, but receives the
// replies on a channel sized for one batch (a batch plus its end marker can
// never overflow it). GetBatch subscribes with the connection's SubChanLen,
// a 512 KiB channel per read: every session's catch-up read allocated one,
// which dominated the server's memory while many clients connected.
func (s *Service) scan(ctx context.Context, stream, subj string, from uint64, batch int, fn func(*jetstream.RawStreamMsg) bool) (end bool, err error) {
	batch = max(1, min(batch, 1000))
	nc := s.js.Conn()
	inbox := nc.NewInbox()
	ch := make(chan *nats.Msg, batch+1)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return false, fmt.Errorf("read %s from %d: subscribe: %w", subj, from, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	api := s.apiPrefix() + "DIRECT.GET." + stream
	for {
		req, _ := json.Marshal(batchRequest{Seq: from, NextFor: subj, Batch: batch})
		if err := nc.PublishRequest(api, inbox, req); err != nil {
			return false, fmt.Errorf("read %s from %d: %w", subj, from, err)
		}
		n, pending, stopped, err := s.readBatch(ctx, ch, &from, fn)
		switch {
		case errors.Is(err, errNoMessages):
			return true, nil
		case err != nil:
			return false, fmt.Errorf("read %s from %d: %w", subj, from, err)
		case stopped:
			return false, nil
		case n == 0 || pending == "0":
			return true, nil
		}
	}
}

// readBatch receives one batch of replies, calling fn for each message and
// moving *from past it. It returns how many messages it passed to fn, the
// Nats-Num-Pending of the last one, and whether fn stopped the read.
func (s *Service) readBatch(ctx context.Context, ch <-chan *nats.Msg, from *uint64, fn func(*jetstream.RawStreamMsg) bool) (n int, pending string, stopped bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.opTimeout)
	defer cancel()
	for {
		var m *nats.Msg
		select {
		case <-ctx.Done():
			return n, pending, false, ctx.Err()
		case m = <-ch:
		}
		if len(m.Data) == 0 && m.Header.Get(headerStatus) != "" {
			switch st := m.Header.Get(headerStatus); st {
			case statusEOB:
				return n, pending, false, nil
			case statusNoMessages:
				if n == 0 {
					return 0, "", false, errNoMessages
				}
				return n, "0", false, nil
			default:
				return n, pending, false, fmt.Errorf("direct get: status %s %s", st, m.Header.Get(headerDesc))
			}
		}
		seq, perr := strconv.ParseUint(m.Header.Get(jetstream.SequenceHeader), 10, 64)
		if perr != nil {
			return n, pending, false, fmt.Errorf("direct get: bad %s header: %w", jetstream.SequenceHeader, perr)
		}
		n++
		*from = seq + 1
		pending = m.Header.Get(headerNumPending)
		if !fn(&jetstream.RawStreamMsg{Subject: m.Header.Get(jetstream.SubjectHeader), Sequence: seq, Header: m.Header, Data: m.Data}) {
			return n, pending, true, nil
		}
	}
}

// apiPrefix returns the JetStream API subject prefix, ending in a dot.
func (s *Service) apiPrefix() string {
	o := s.js.Options()
	switch {
	case o.APIPrefix != "" && o.APIPrefix[len(o.APIPrefix)-1] == '.':
		return o.APIPrefix
	case o.APIPrefix != "":
		return o.APIPrefix + "."
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	default:
		return "$JS.API."
	}
}
