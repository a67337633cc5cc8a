package groups

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"

	"github.com/vartalap/vartalap/schema"
)

// Event actions (Meta "action").
const (
	actionAdd    = "add"
	actionRemove = "remove"
	actionUpdate = "update"
	actionRole   = "role"
	actionDelete = "delete"
)

// Event bodies (seed group-event.js shapes, plus update, role and delete).
type (
	memberJSON struct {
		Username schema.UserID `json:"username"`
		Role     string        `json:"role"`
	}
	addedBody struct {
		Added []memberJSON `json:"added"`
	}
	removedBody struct {
		Removed []schema.UserID `json:"removed"`
	}
	roleBody struct {
		Username schema.UserID `json:"username"`
		Role     string        `json:"role"`
	}
	deletedBody struct {
		Deleted bool `json:"deleted"`
	}
)

// updateBody is {"name"?, "profilePic"?}: only the fields that changed; a
// cleared picture is null.
func updateBody(up metaUpdate) map[string]any {
	b := make(map[string]any, 2)
	if up.name != nil {
		b["name"] = *up.name
	}
	if up.pic != nil {
		b["profilePic"] = picPtr(*up.pic)
	}
	return b
}

// event is one group event and who receives a copy.
type event struct {
	action    string
	body      any
	receivers []schema.UserID
}

// newEventMessage builds the NOTIFICATION message of one group event.
func newEventMessage(gid schema.GroupID, actor schema.UserID, action string, body any, now time.Time) (*schema.Message, error) {
	content, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("encode %s event: %w", action, err)
	}
	id := newUUID()
	ts := uint64(now.UnixMilli())
	return &schema.Message{
		Version:     3.0,
		ID:          id,
		Type:        schema.TypeNotification,
		Channel:     schema.ChannelIndividual,
		Ephemeral:   false,
		Source:      string(actor),
		Destination: string(gid),
		Content:     content,
		Timestamp:   ts,
		Meta: map[string]string{
			"chatId":               string(gid),
			schema.MetaChatID:      string(gid),
			schema.MetaContentType: "notification",
			schema.MetaAction:      action,
		},
		ServerID:        id,
		ServerTimestamp: ts,
	}, nil
}

// publishEvents stores one copy of each event in each receiver's INBOX
// subject, as atomic batches of at most maxAtomicBatch messages, before the
// caller answers. Each copy carries Nats-Msg-Id "<eventID>:<receiver>", so
// a retried batch that was in fact stored is recognised as a duplicate.
func (s *Service) publishEvents(ctx context.Context, gid schema.GroupID, actor schema.UserID, events ...event) error {
	var msgs []*nats.Msg
	now := s.now()
	for _, ev := range events {
		m, err := newEventMessage(gid, actor, ev.action, ev.body, now)
		if err != nil {
			return err
		}
		data := m.MarshalProto()
		for _, r := range ev.receivers {
			if !r.Valid() {
				continue // never stored; kept out of subjects
			}
			msg := nats.NewMsg(schema.UserInbox(r))
			msg.Header.Set(schema.HeaderMsgID, m.ID+":"+schema.Token(r))
			msg.Data = data
			msgs = append(msgs, msg)
		}
	}
	for chunk := range slices.Chunk(msgs, maxAtomicBatch) {
		if err := s.publishEventBatch(ctx, chunk); err != nil {
			return fmt.Errorf("store %s events of group %s: %w", events[0].action, gid, err)
		}
	}
	return nil
}

// publishEventBatch publishes one atomic batch, retrying with the same
// message ids. A duplicate-id rejection means an earlier attempt was
// stored (the batch is all or nothing).
func (s *Service) publishEventBatch(ctx context.Context, msgs []*nats.Msg) error {
	var err error
	for attempt := range eventAttempts {
		if attempt > 0 {
			t := time.NewTimer(time.Duration(attempt) * 100 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return errors.Join(err, ctx.Err())
			case <-t.C:
			}
		}
		err = s.publishAtomic(ctx, msgs)
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstreamext.JSErrCodeBatchPublishDuplicateMsgID {
			return nil
		}
		if err == nil {
			return nil
		}
		if errors.As(err, &apiErr) && apiErr.ErrorCode != jetstreamext.JSErrCodeAtomicPublishTooManyInflight {
			// Rejected by the stream, typically because one receiver's
			// inbox is full: store the events one by one so that one
			// full inbox does not block every change of the group.
			return s.publishEach(ctx, msgs)
		}
	}
	return err
}

// errCodeSubjectFull is JetStream's "maximum messages per subject exceeded"
// (a full inbox: INBOX discards new messages per subject).
const errCodeSubjectFull = 10077

// publishEach stores msgs one at a time. A receiver whose inbox is full
// misses the event (logged); duplicates were stored before.
func (s *Service) publishEach(ctx context.Context, msgs []*nats.Msg) error {
	for _, m := range msgs {
		_, err := s.js.PublishMsg(ctx, m)
		var apiErr *jetstream.APIError
		switch {
		case err == nil:
		case errors.As(err, &apiErr) && apiErr.ErrorCode == errCodeSubjectFull:
			s.log.Warn("group event not stored: inbox full", "subject", m.Subject, "msg_id", m.Header.Get(schema.HeaderMsgID))
		default:
			return err
		}
	}
	return nil
}
