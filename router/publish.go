package router

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"
)

// errCodeStoreFailed is the JetStream API error code a stream answers with
// when it cannot store a message; descMaxPerSubject is its description when
// the subject is at MaxMsgsPerSubject with DiscardNew per subject (measured
// against nats-server 2.15: code 503, err_code 10077, for single and atomic
// batch publishes alike).
const (
	errCodeStoreFailed jetstream.ErrorCode = 10077
	descMaxPerSubject                      = "maximum messages per subject exceeded"
)

// publishAtomic stores outs as one atomic batch: all or nothing, one fsync.
func (r *Router) publishAtomic(ctx context.Context, outs []out) error {
	msgs := make([]*nats.Msg, len(outs))
	for i, o := range outs {
		msgs[i] = o.msg
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := jetstreamext.PublishMsgBatch(ctx, r.js, msgs)
	return err
}

type result uint8

const (
	stored    result = iota // stored now or earlier (duplicate)
	full                    // the subject is at its per-subject cap
	transient               // anything else; may succeed later
)

// publishEach stores every out on its own: one is published and awaited,
// several are all sent before any PubAck is awaited (each still fsynced on
// its own under sync: always, but with no round trip between them). The
// PubAcks come to a reply subscription of this call, so nothing outlives
// it (the jetstream package's async publisher keeps goroutines for the
// life of the connection, which the router does not own).
func (r *Router) publishEach(ctx context.Context, outs []out) []result {
	res := make([]result, len(outs))
	if len(outs) == 1 {
		res[0] = r.publishOne(ctx, outs[0].msg)
		return res
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	nc := r.js.Conn()
	prefix := nats.NewInbox() + "."
	acks := make(chan *nats.Msg, len(outs))
	sub, err := nc.ChanSubscribe(prefix+"*", acks)
	if err != nil {
		for i, o := range outs {
			res[i] = r.classify(o.msg, err)
		}
		return res
	}
	defer func() { _ = sub.Unsubscribe() }()
	waiting := 0
	answered := make([]bool, len(outs))
	for i, o := range outs {
		m := *o.msg
		m.Reply = prefix + strconv.Itoa(i)
		if err := nc.PublishMsg(&m); err != nil {
			res[i], answered[i] = r.classify(o.msg, err), true
			continue
		}
		waiting++
	}
	for waiting > 0 {
		select {
		case a := <-acks:
			i, err := strconv.Atoi(strings.TrimPrefix(a.Subject, prefix))
			if err != nil || i < 0 || i >= len(outs) || answered[i] {
				continue
			}
			answered[i] = true
			waiting--
			if err := pubAckError(a); err != nil {
				res[i] = r.classify(outs[i].msg, err)
			} else {
				res[i] = stored // a duplicate PubAck is success too
			}
		case <-ctx.Done():
			for i, done := range answered {
				if !done {
					res[i] = r.classify(outs[i].msg, ctx.Err())
				}
			}
			return res
		}
	}
	return res
}

// pubAckError reads a JetStream publish answer: nil for a PubAck, the
// stream's error, or no responders.
func pubAckError(m *nats.Msg) error {
	if m.Header.Get("Status") == "503" {
		return nats.ErrNoResponders
	}
	var ack struct {
		Error  *jetstream.APIError `json:"error"`
		Stream string              `json:"stream"`
	}
	if err := json.Unmarshal(m.Data, &ack); err != nil {
		return fmt.Errorf("publish answer: %w", err)
	}
	if ack.Error != nil {
		return ack.Error
	}
	if ack.Stream == "" {
		return errors.New("publish answer names no stream")
	}
	return nil
}

// publishOne stores one message on its own.
func (r *Router) publishOne(ctx context.Context, m *nats.Msg) result {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := r.js.PublishMsg(ctx, m)
	if err == nil {
		return stored // a duplicate PubAck is success too
	}
	return r.classify(m, err)
}

// classify tells a full inbox from a transient failure of publishing m.
func (r *Router) classify(m *nats.Msg, err error) result {
	if isInboxFull(err) {
		return full
	}
	r.log.Warn("publish error", "subject", m.Subject, "err", err)
	return transient
}

func isInboxFull(err error) bool {
	var ae *jetstream.APIError
	return errors.As(err, &ae) && ae.ErrorCode == errCodeStoreFailed && ae.Description == descMaxPerSubject
}
