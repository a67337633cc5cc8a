package router

import (
	"context"
	"errors"

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

// publishOne stores one message on its own.
func (r *Router) publishOne(ctx context.Context, m *nats.Msg) result {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := r.js.PublishMsg(ctx, m)
	if err == nil {
		return stored // a duplicate PubAck is success too
	}
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
