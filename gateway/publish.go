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

// busMsg builds the bus message for an accepted, stamped m from (user,
// device): ephemeral messages go to schema.Live(user) (core NATS, never
// stored), the rest to schema.ChatIn(user) with the de-duplication id
// "<token(user)>:<message id>", so a resend of the same id is stored once.
func busMsg(user schema.UserID, device schema.DeviceID, m *schema.Message) *nats.Msg {
	subject := schema.ChatIn(user)
	if m.Ephemeral {
		subject = schema.Live(user)
	}
	msg := &nats.Msg{Subject: subject, Header: make(nats.Header, 2), Data: m.MarshalProto()}
	if !m.Ephemeral {
		msg.Header.Set(schema.HeaderMsgID, schema.Token(user)+":"+m.ID)
	}
	msg.Header.Set(schema.HeaderDevice, string(device))
	return msg
}

// publish hands one accepted message to the bus and returns once it is
// accepted: for a stored message, after the JetStream PubAck (a duplicate
// PubAck counts as accepted); for an ephemeral one, after the core publish.
func (g *Gateway) publish(ctx context.Context, user schema.UserID, device schema.DeviceID, m *schema.Message) error {
	msg := busMsg(user, device, m)
	if m.Ephemeral {
		if err := g.nc.PublishMsg(msg); err != nil {
			return fmt.Errorf("publish ephemeral %s: %w", msg.Subject, err)
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, g.cfg.PublishTimeout)
	defer cancel()
	return g.commit.publish(ctx, msg)
}

// publishAll publishes msgs (core publishes for ephemeral ones, the group
// committer for the rest) and waits for every PubAck, so a batch costs
// about one commit. errs[i] is the outcome of msgs[i].
func (g *Gateway) publishAll(ctx context.Context, user schema.UserID, device schema.DeviceID, msgs []*schema.Message) []error {
	errs := make([]error, len(msgs))
	var stored []*nats.Msg
	var idx []int
	for i, m := range msgs {
		msg := busMsg(user, device, m)
		if m.Ephemeral {
			if err := g.nc.PublishMsg(msg); err != nil {
				errs[i] = fmt.Errorf("publish ephemeral %s: %w", msg.Subject, err)
			}
			continue
		}
		stored = append(stored, msg)
		idx = append(idx, i)
	}
	ctx, cancel := context.WithTimeout(ctx, g.cfg.PublishTimeout)
	defer cancel()
	for j, err := range g.commit.publishAll(ctx, stored) {
		errs[idx[j]] = err
	}
	return errs
}
