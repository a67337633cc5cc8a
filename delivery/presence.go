package delivery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

// presenceEntry is one online device in a user's presence value
// {"<device>": {"node":…, "since":…, "session":…}}.
type presenceEntry struct {
	Node    string `json:"node"`
	Since   int64  `json:"since"` // unix ms
	Session string `json:"session"`
}

type presenceDoc map[string]presenceEntry

// presenceAdd records ss as online and returns the revision written, which
// orders the sessions of a user across nodes (see kickMsg).
func (s *Service) presenceAdd(ctx context.Context, a *assets, ss *Session) (uint64, error) {
	_, rev, err := cas(ctx, s.log, a.presence, schema.Token(ss.user), func(d *presenceDoc, _ bool) casOp {
		if *d == nil {
			*d = make(presenceDoc)
		}
		(*d)[string(ss.device)] = presenceEntry{Node: s.cfg.Node, Since: time.Now().UnixMilli(), Session: ss.id}
		return casPut
	})
	if err != nil {
		return 0, fmt.Errorf("register presence of %s: %w", ss.user, err)
	}
	return rev, nil
}

// presenceRemove removes ss's entry unless a newer session replaced it.
func (s *Service) presenceRemove(ctx context.Context, a *assets, ss *Session) error {
	_, _, err := cas(ctx, s.log, a.presence, schema.Token(ss.user), func(d *presenceDoc, _ bool) casOp {
		e, ok := (*d)[string(ss.device)]
		if !ok || e.Session != ss.id {
			return casNone
		}
		delete(*d, string(ss.device))
		if len(*d) == 0 {
			return casDelete
		}
		return casPut
	})
	if err != nil {
		return fmt.Errorf("deregister presence of %s: %w", ss.user, err)
	}
	return nil
}

// Online returns the user's devices with a session on a node whose heartbeat
// is alive, sorted.
func (s *Service) Online(ctx context.Context, user schema.UserID) ([]schema.DeviceID, error) {
	if !user.Valid() {
		return nil, fmt.Errorf("online: %w", schema.ErrInvalidID)
	}
	a, err := s.getAssets()
	if err != nil {
		return nil, err
	}
	doc, _, err := cas(ctx, s.log, a.presence, schema.Token(user), func(*presenceDoc, bool) casOp { return casNone })
	if err != nil {
		return nil, fmt.Errorf("online: %w", err)
	}
	alive := make(map[string]bool)
	var out []schema.DeviceID
	for device, e := range *doc {
		ok, seen := alive[e.Node]
		if !seen {
			_, err := a.nodes.Get(ctx, e.Node)
			switch {
			case err == nil:
				ok = true
			case errors.Is(err, jetstream.ErrKeyNotFound), errors.Is(err, jetstream.ErrInvalidKey):
			default:
				return nil, fmt.Errorf("online: node %s: %w", e.Node, err)
			}
			alive[e.Node] = ok
		}
		if ok {
			out = append(out, schema.DeviceID(device))
		}
	}
	slices.Sort(out)
	return out, nil
}
