package router

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"

	"github.com/vartalap/vartalap/schema"
)

// liveLoop routes ephemeral messages from the msg.live.* subscription until
// ctx ends.
func (r *Router) liveLoop(ctx context.Context, ch <-chan *nats.Msg) {
	for {
		select {
		case <-ctx.Done():
			return
		case msg := <-ch:
			r.routeLive(ctx, msg.Subject, msg.Data)
		}
	}
}

// routeLive decodes one ephemeral message and publishes it live. Ephemeral
// messages are never stored and never retried: bad input is dropped.
func (r *Router) routeLive(ctx context.Context, subject string, data []byte) {
	m, err := schema.UnmarshalProto(data)
	if err != nil {
		r.log.Warn("undecodable live message dropped", "subject", subject, "err", err)
		r.metrics.byKind[kindPoison].Inc()
		return
	}
	sender, err := senderOf(subject, m)
	if err != nil {
		r.log.Warn("live message with bad sender dropped", "subject", subject, "err", err)
		r.metrics.byKind[kindPoison].Inc()
		return
	}
	r.metrics.byKind[kindEphemeral].Inc()
	r.publishLive(ctx, m, sender, data, nil)
}

// publishLive core-publishes data (the encoded m) to the live subject of
// each recipient. cache may be nil.
func (r *Router) publishLive(ctx context.Context, m *schema.Message, sender schema.UserID, data []byte, cache groupCache) {
	if m.Channel != schema.ChannelGroup {
		to := schema.UserID(m.Destination)
		if !to.Valid() {
			r.log.Info("live message with bad destination dropped", "msg_id", m.ID, "user", sender)
			return
		}
		r.corePublish(schema.Deliver(to), data)
		return
	}
	g := schema.GroupID(m.Destination)
	if !g.Valid() {
		r.log.Info("live message with bad group dropped", "msg_id", m.ID, "user", sender)
		return
	}
	rcpts, err := r.recipients(ctx, cache, g, sender)
	switch {
	case errors.Is(err, errUnknownGroup):
		r.log.Info("live message to unknown group dropped", "msg_id", m.ID, "user", sender, "group", g)
		return
	case errors.Is(err, errNotMember):
		r.log.Info("live message from non-member dropped", "msg_id", m.ID, "user", sender, "group", g)
		return
	case err != nil:
		r.log.Warn("live message dropped on group lookup error", "msg_id", m.ID, "user", sender, "group", g, "err", err)
		return
	}
	for _, u := range rcpts {
		r.corePublish(schema.Deliver(u), data)
	}
}

func (r *Router) corePublish(subject string, data []byte) {
	if err := r.nc.Publish(subject, data); err != nil {
		r.log.Warn("live publish error", "subject", subject, "err", err)
	}
}
