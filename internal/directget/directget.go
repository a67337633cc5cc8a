// Package directget reads JetStream streams with batched Direct Gets: no
// consumer, no stream lookup, and each request's replies received on a
// channel sized for them.
//
// It does what jetstreamext.GetBatch and GetLastMsgsFor do, without their
// cost per call: they subscribe with the connection's SubChanLen, a 512 KiB
// channel per read, which dominated the server's memory when thousands of
// clients connected at once (each session reads its inbox and its
// memberships on connect).
package directget

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Errors callers branch on.
var (
	// ErrNoMessages: nothing matched the request.
	ErrNoMessages = errors.New("no messages")
	// ErrTooManySubjects: a multi_last request matched more subjects than
	// the server answers in one reply stream (1,024).
	ErrTooManySubjects = errors.New("too many subjects for one multi_last request")
)

// MaxMultiLast is the most subjects one multi_last request returns.
const MaxMultiLast = 1024

// Reply headers and statuses.
const (
	headerNumPending = "Nats-Num-Pending" // matching messages after this one (as of the request)
	headerStatus     = "Status"
	headerDesc       = "Description"
	statusEOB        = "204" // end of batch
	statusNoMessages = "404"
	statusTooMany    = "413"
)

// request is a batched Direct Get request body.
type request struct {
	Seq       uint64   `json:"seq,omitempty"`
	NextFor   string   `json:"next_by_subj,omitempty"`
	Batch     int      `json:"batch,omitempty"`
	MultiLast []string `json:"multi_last,omitempty"`
}

// APIPrefix returns js's JetStream API subject prefix, ending in a dot.
func APIPrefix(js jetstream.JetStream) string {
	o := js.Options()
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

// Scan reads the messages of stream on subj with seq >= from in order,
// batch at a time (at most 1,000), calling fn for each until fn returns
// false. Each batch must arrive within timeout. It reports whether the end
// of the subject was reached.
func Scan(ctx context.Context, js jetstream.JetStream, stream, subj string, from uint64, batch int, timeout time.Duration, fn func(*jetstream.RawStreamMsg) bool) (end bool, err error) {
	batch = max(1, min(batch, 1000))
	r, err := open(js, stream, batch+1) // a batch and its end marker never overflow it
	if err != nil {
		return false, fmt.Errorf("read %s from %d: %w", subj, from, err)
	}
	defer r.close()
	for {
		n, pending, stopped, err := r.do(ctx, timeout, request{Seq: from, NextFor: subj, Batch: batch}, func(m *jetstream.RawStreamMsg) bool {
			from = m.Sequence + 1
			return fn(m)
		})
		switch {
		case errors.Is(err, ErrNoMessages):
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

// LastMsgs returns the last message of every subject of stream matching
// filters (at most MaxMultiLast subjects, else ErrTooManySubjects), as one
// isolated snapshot, in stream order. The reply must arrive within timeout.
func LastMsgs(ctx context.Context, js jetstream.JetStream, stream string, filters []string, timeout time.Duration) ([]*jetstream.RawStreamMsg, error) {
	// Every subject named exactly gets at most one reply, a wildcard up to
	// MaxMultiLast: size the channel for the replies this request can get.
	size := 0
	for _, f := range filters {
		if isWild(f) {
			size = MaxMultiLast
			break
		}
		size++
	}
	r, err := open(js, stream, min(size, MaxMultiLast)+1)
	if err != nil {
		return nil, fmt.Errorf("multi_last %v: %w", filters, err)
	}
	defer r.close()
	var out []*jetstream.RawStreamMsg
	_, pending, _, err := r.do(ctx, timeout, request{MultiLast: filters}, func(m *jetstream.RawStreamMsg) bool {
		out = append(out, m)
		return true
	})
	switch {
	case errors.Is(err, ErrNoMessages):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("multi_last %v: %w", filters, err)
	case pending != "0" && pending != "":
		return nil, fmt.Errorf("multi_last %v: incomplete reply (%s pending)", filters, pending)
	}
	return out, nil
}

func isWild(subj string) bool {
	for i := 0; i < len(subj); i++ {
		if subj[i] == '*' || subj[i] == '>' {
			return true
		}
	}
	return false
}

// reader is one reply subscription.
type reader struct {
	nc  *nats.Conn
	api string
	in  string
	ch  chan *nats.Msg
	sub *nats.Subscription
}

func open(js jetstream.JetStream, stream string, size int) (*reader, error) {
	nc := js.Conn()
	r := &reader{nc: nc, api: APIPrefix(js) + "DIRECT.GET." + stream, in: nc.NewInbox(), ch: make(chan *nats.Msg, size)}
	sub, err := nc.ChanSubscribe(r.in, r.ch)
	if err != nil {
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	r.sub = sub
	return r, nil
}

func (r *reader) close() { _ = r.sub.Unsubscribe() }

// do sends one request and receives its replies, calling fn for each
// message. It returns how many messages it passed to fn, the
// Nats-Num-Pending of the last one, and whether fn stopped the read (the
// rest of the batch is then left unread: the subscription is dropped with
// it).
func (r *reader) do(ctx context.Context, timeout time.Duration, req request, fn func(*jetstream.RawStreamMsg) bool) (n int, pending string, stopped bool, err error) {
	body, err := json.Marshal(req)
	if err != nil {
		return 0, "", false, err
	}
	if err := r.nc.PublishRequest(r.api, r.in, body); err != nil {
		return 0, "", false, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		var m *nats.Msg
		select {
		case <-ctx.Done():
			return n, pending, false, ctx.Err()
		case m = <-r.ch:
		}
		if len(m.Data) == 0 && m.Header.Get(headerStatus) != "" {
			switch st := m.Header.Get(headerStatus); st {
			case statusEOB:
				return n, pending, false, nil
			case statusNoMessages:
				if n == 0 {
					return 0, "", false, ErrNoMessages
				}
				return n, "0", false, nil
			case statusTooMany:
				return n, pending, false, ErrTooManySubjects
			default:
				return n, pending, false, fmt.Errorf("direct get: status %s %s", st, m.Header.Get(headerDesc))
			}
		}
		seq, perr := strconv.ParseUint(m.Header.Get(jetstream.SequenceHeader), 10, 64)
		if perr != nil {
			return n, pending, false, fmt.Errorf("direct get: bad %s header: %w", jetstream.SequenceHeader, perr)
		}
		n++
		pending = m.Header.Get(headerNumPending)
		if !fn(&jetstream.RawStreamMsg{Subject: m.Header.Get(jetstream.SubjectHeader), Sequence: seq, Header: m.Header, Data: m.Data}) {
			return n, pending, true, nil
		}
	}
}
