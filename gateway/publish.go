package gateway

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/vartalap/vartalap/schema"
)

// errPublishTimeout means no PubAck arrived within PublishTimeout.
var errPublishTimeout = errors.New("no pub ack within the publish timeout")

// liveMsg builds the core message for an accepted, stamped ephemeral m from
// (user, device): it goes to schema.Live(user) and is never stored.
func liveMsg(user schema.UserID, device schema.DeviceID, m *schema.Message) *nats.Msg {
	msg := &nats.Msg{Subject: schema.Live(user), Header: make(nats.Header, 1), Data: m.MarshalProto()}
	msg.Header.Set(schema.HeaderDevice, string(device))
	return msg
}

// publish hands one accepted message to the bus and returns once it is
// accepted: for a stored message, after the CHAT_IN PubAck of the batch it
// was committed in; for an ephemeral one, after the core publish.
func (g *Gateway) publish(ctx context.Context, user schema.UserID, device schema.DeviceID, m *schema.Message) error {
	return g.publishAll(ctx, user, device, []*schema.Message{m})[0]
}

// publishAll publishes msgs (core publishes for ephemeral ones, the group
// committer for the rest) and waits for every PubAck, so a batch costs
// about one commit. errs[i] is the outcome of msgs[i].
func (g *Gateway) publishAll(ctx context.Context, user schema.UserID, device schema.DeviceID, msgs []*schema.Message) []error {
	errs := make([]error, len(msgs))
	var stored []entry
	var idx []int
	for i, m := range msgs {
		if m.Ephemeral {
			msg := liveMsg(user, device, m)
			if err := g.nc.PublishMsg(msg); err != nil {
				errs[i] = fmt.Errorf("publish ephemeral %s: %w", msg.Subject, err)
			}
			continue
		}
		stored = append(stored, entry{data: m.MarshalProto(), device: device})
		idx = append(idx, i)
	}
	if len(stored) == 0 {
		return errs
	}
	ctx, cancel := context.WithTimeout(ctx, g.cfg.PublishTimeout)
	defer cancel()
	for j, err := range g.commit.publishAll(ctx, stored) {
		errs[idx[j]] = err
	}
	return errs
}
