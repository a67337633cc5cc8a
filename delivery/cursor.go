package delivery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

// cursorDoc is the value of a user's key in the cursors bucket.
type cursorDoc struct {
	Devices map[string]*deviceCursor `json:"devices"`
	// Purged: every INBOX message of the user with seq <= Purged has been
	// purged (acked by every device known at the time).
	Purged uint64 `json:"purged"`
}

// deviceCursor is one device's position in its user's inbox and groups.
type deviceCursor struct {
	laneCursor // the inbox
	// Seen: when the device last connected or acked (unix ms, refreshed
	// at most daily on connect and on every cursor write); 0 in cursors
	// written before it existed.
	Seen int64 `json:"seen,omitempty"`
	// Groups: the device's position in the GROUP_LOG subject of each group
	// it has read (by group id).
	Groups map[string]*laneCursor `json:"groups,omitempty"`
}

// laneCursor is a position in one stream subject.
type laneCursor struct {
	// Floor: every seq of the subject <= Floor is acked by the device.
	Floor uint64 `json:"floor"`
	// Acked: acked seqs above Floor, ascending.
	Acked []uint64 `json:"acked,omitempty"`
}

// merge folds o into c: the higher floor and the union of acked seqs above
// it, for the inbox and each group.
func (c *deviceCursor) merge(o *deviceCursor) {
	c.laneCursor.merge(&o.laneCursor)
	c.Seen = max(c.Seen, o.Seen)
	for g, og := range o.Groups {
		if c.Groups == nil {
			c.Groups = make(map[string]*laneCursor, len(o.Groups))
		}
		cg := c.Groups[g]
		if cg == nil {
			cg = &laneCursor{}
			c.Groups[g] = cg
		}
		cg.merge(og)
	}
}

// clone returns a deep copy of c.
func (c *deviceCursor) clone() *deviceCursor {
	out := &deviceCursor{laneCursor: c.laneCursor.clone(), Seen: c.Seen}
	if len(c.Groups) > 0 {
		out.Groups = make(map[string]*laneCursor, len(c.Groups))
		for g, gc := range c.Groups {
			cl := gc.clone()
			out.Groups[g] = &cl
		}
	}
	return out
}

func (c *laneCursor) merge(o *laneCursor) {
	c.Floor = max(c.Floor, o.Floor)
	acked := make([]uint64, 0, len(c.Acked)+len(o.Acked))
	for _, list := range [][]uint64{c.Acked, o.Acked} {
		for _, q := range list {
			if q > c.Floor {
				acked = append(acked, q)
			}
		}
	}
	slices.Sort(acked)
	c.Acked = slices.Compact(acked)
	if len(c.Acked) == 0 {
		c.Acked = nil
	}
}

func (c laneCursor) clone() laneCursor {
	return laneCursor{Floor: c.Floor, Acked: slices.Clone(c.Acked)}
}

// minFloor returns the lowest floor over the devices that are not idle (not
// seen since idleBefore, unix ms; 0: none is idle), and false if there are
// none.
func (d *cursorDoc) minFloor(idleBefore int64) (uint64, bool) {
	first := true
	var m uint64
	for _, c := range d.Devices {
		if c.Seen != 0 && c.Seen < idleBefore {
			continue
		}
		if first || c.Floor < m {
			m, first = c.Floor, false
		}
	}
	return m, !first
}

type casOp int

const (
	casNone casOp = iota
	casPut
	casDelete
)

const casAttempts = 32

// cas reads key as JSON into a fresh T, lets fn change it and writes it back
// with compare-and-set on the revision, retrying on conflicts. A value that
// does not decode is logged and replaced (treated as absent). It returns the
// value as last seen or written and its revision (0 when absent or deleted).
func cas[T any](ctx context.Context, log *slog.Logger, kv jetstream.KeyValue, key string, fn func(v *T, exists bool) casOp) (*T, uint64, error) {
	for range casAttempts {
		v := new(T)
		var rev uint64
		e, err := kv.Get(ctx, key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return nil, 0, fmt.Errorf("get %s/%s: %w", kv.Bucket(), key, err)
		default:
			rev = e.Revision()
			if err := json.Unmarshal(e.Value(), v); err != nil {
				log.Error("corrupt kv value replaced", "bucket", kv.Bucket(), "key", key, "err", err)
				v = new(T)
			}
		}
		op := fn(v, rev != 0)
		var wrev uint64
		switch {
		case op == casNone:
			return v, rev, nil
		case op == casDelete && rev == 0:
			return v, 0, nil
		case op == casDelete:
			err = kv.Delete(ctx, key, jetstream.LastRevision(rev))
		default:
			b, merr := json.Marshal(v)
			if merr != nil {
				return nil, 0, fmt.Errorf("encode %s/%s: %w", kv.Bucket(), key, merr)
			}
			if rev == 0 {
				wrev, err = kv.Create(ctx, key, b)
			} else {
				wrev, err = kv.Update(ctx, key, b, rev)
			}
		}
		if err == nil {
			return v, wrev, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) && !errors.Is(err, jetstream.ErrKeyRevisionMismatch) && !isWrongLastSeq(err) {
			return nil, 0, fmt.Errorf("write %s/%s: %w", kv.Bucket(), key, err)
		}
	}
	return nil, 0, fmt.Errorf("write %s/%s: too much contention", kv.Bucket(), key)
}

// isWrongLastSeq reports a CAS conflict on Delete with LastRevision, which
// nats.go returns as a plain API error.
func isWrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

func (s *Service) updateCursor(ctx context.Context, a *assets, user schema.UserID, fn func(d *cursorDoc) bool) (*cursorDoc, error) {
	doc, _, err := cas(ctx, s.log, a.cursors, schema.Token(user), func(d *cursorDoc, _ bool) casOp {
		if d.Devices == nil {
			d.Devices = make(map[string]*deviceCursor)
		}
		if fn(d) {
			return casPut
		}
		return casNone
	})
	if err != nil {
		return nil, fmt.Errorf("update cursor of %s: %w", user, err)
	}
	return doc, nil
}

// openCursor returns the device's cursor, registering the device (at the
// user's purge point) when it has none, so purges wait for it from now on.
func (s *Service) openCursor(ctx context.Context, a *assets, user schema.UserID, device schema.DeviceID) (deviceCursor, error) {
	var out deviceCursor
	now := time.Now().UnixMilli()
	_, err := s.updateCursor(ctx, a, user, func(d *cursorDoc) bool {
		if c := d.Devices[string(device)]; c != nil {
			out = *c.clone()
			if now-c.Seen < seenRefresh.Milliseconds() {
				return false
			}
			c.Seen = now // a connect is activity; written at most daily
			return true
		}
		out = deviceCursor{laneCursor: laneCursor{Floor: d.Purged}}
		d.Devices[string(device)] = &deviceCursor{laneCursor: laneCursor{Floor: d.Purged}, Seen: now}
		return true
	})
	return out, err
}

// seenRefresh is how stale a device's Seen may be before a connect writes it.
const seenRefresh = 24 * time.Hour

// purgeConcurrency bounds the purges one node runs at once, and
// purgesPerSecond how many sessions start one. A purge is an fsynced write
// that walks the user's blocks under the INBOX stream's lock: 2,000
// sessions that connected together purged together a minute later and
// stalled the stream for seconds, and 1,000 members of a busy group (whose
// messages are in every block) purging once a minute each kept it locked
// (group soak: end-to-end p90 18 s; 0.56 s without purges).
const (
	purgeConcurrency = 1
	purgesPerSecond  = 4
)

// tryPurge runs maybePurge if a purge slot is free and, unless urgent (the
// device acked purgeAcks messages since its last purge: its inbox fills),
// the node's purge rate allows it. It reports whether it ran; sessions skip
// a purge when the node is busy purging and try again later.
func (s *Service) tryPurge(ctx context.Context, a *assets, user schema.UserID, doc *cursorDoc, urgent bool) (bool, error) {
	if !urgent && !s.purgeRate.Allow() {
		return false, nil
	}
	select {
	case s.purgeSlots <- struct{}{}:
	default:
		return false, nil
	}
	defer func() { <-s.purgeSlots }()
	return true, s.maybePurge(ctx, a, user, doc)
}

// purgeWait runs maybePurge when a purge slot is free, waiting for one at
// most until ctx ends.
func (s *Service) purgeWait(ctx context.Context, a *assets, user schema.UserID, doc *cursorDoc) error {
	select {
	case s.purgeSlots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-s.purgeSlots }()
	return s.maybePurge(ctx, a, user, doc)
}

// maybePurge purges the user's messages acked by every known device and
// records the purge point. With no device left nothing is purged: a future
// device will get what is still there.
func (s *Service) maybePurge(ctx context.Context, a *assets, user schema.UserID, doc *cursorDoc) error {
	var idleBefore int64
	if s.cfg.DeviceIdle > 0 {
		idleBefore = time.Now().Add(-s.cfg.DeviceIdle).UnixMilli()
	}
	floor, ok := doc.minFloor(idleBefore)
	if !ok || floor <= doc.Purged {
		return nil
	}
	subj := schema.UserInbox(user)
	if err := a.inbox.Purge(ctx, jetstream.WithPurgeSubject(subj), jetstream.WithPurgeSequence(floor+1)); err != nil {
		return fmt.Errorf("purge %s below %d: %w", subj, floor+1, err)
	}
	_, err := s.updateCursor(ctx, a, user, func(d *cursorDoc) bool {
		if d.Purged >= floor {
			return false
		}
		d.Purged = floor
		return true
	})
	return err
}

// ForgetDevice drops the device's cursor (logout) and purges what is now
// acked by every remaining device.
func (s *Service) ForgetDevice(ctx context.Context, user schema.UserID, device schema.DeviceID) error {
	if !user.Valid() || !device.Valid() {
		return fmt.Errorf("forget device: %w", schema.ErrInvalidID)
	}
	a, err := s.getAssets()
	if err != nil {
		return err
	}
	doc, err := s.updateCursor(ctx, a, user, func(d *cursorDoc) bool {
		if _, ok := d.Devices[string(device)]; !ok {
			return false
		}
		delete(d.Devices, string(device))
		return true
	})
	if err != nil {
		return err
	}
	return s.purgeWait(ctx, a, user, doc)
}

// AckByID marks the messages with the given ids as acked by device without a
// socket (REST acks). It scans the device's pending messages from its
// cursor, at most MaxPerUser of them per subject: the inbox, then (while
// some ids matched nothing) each group of the user; and advances the
// cursor. A session of the device on this node is told as well.
func (s *Service) AckByID(ctx context.Context, user schema.UserID, device schema.DeviceID, ids []string) error {
	if !user.Valid() || !device.Valid() {
		return fmt.Errorf("ack by id: %w", schema.ErrInvalidID)
	}
	if len(ids) == 0 {
		return nil
	}
	a, err := s.getAssets()
	if err != nil {
		return err
	}
	want := make(map[string]bool, len(ids)) // id -> matched
	for _, id := range ids {
		want[id] = false
	}

	// Snapshot the device's cursor.
	var cur *deviceCursor
	var known bool
	if _, _, err := cas(ctx, s.log, a.cursors, schema.Token(user), func(d *cursorDoc, _ bool) casOp {
		if c := d.Devices[string(device)]; c != nil {
			cur, known = c.clone(), true
		} else {
			cur = &deviceCursor{laneCursor: laneCursor{Floor: d.Purged}}
		}
		return casNone
	}); err != nil {
		return fmt.Errorf("ack by id: %w", err)
	}

	upd := &deviceCursor{Seen: time.Now().UnixMilli()}
	var matched int // messages acked now, not before
	upd.laneCursor, matched, err = s.ackScan(ctx, schema.StreamInbox, schema.UserInbox(user), cur.laneCursor, want, nil)
	if err != nil {
		return fmt.Errorf("ack by id: %w", err)
	}
	changed := upd.Floor != cur.Floor || len(upd.Acked) != len(cur.Acked)
	if s.cfg.Groups != nil && slices.ContainsFunc(ids, func(id string) bool { return !want[id] }) {
		ms, err := s.cfg.Groups.Memberships(ctx, user)
		if err != nil {
			return fmt.Errorf("ack by id: memberships: %w", err)
		}
		own := schema.Token(user)
		for _, m := range ms {
			if !m.Group.Valid() || len(m.Epochs) == 0 {
				continue
			}
			gc := laneCursor{Floor: m.Start()}
			if c := cur.Groups[string(m.Group)]; c != nil {
				gc = c.clone()
				gc.Floor = max(gc.Floor, m.Start())
			}
			skip := func(r *jetstream.RawStreamMsg) bool {
				return !m.Visible(r.Sequence) || r.Header.Get(schema.HeaderSender) == own
			}
			lc, n, err := s.ackScan(ctx, schema.StreamGroupLog, schema.GroupLog(m.Group), gc, want, skip)
			if err != nil {
				return fmt.Errorf("ack by id: %w", err)
			}
			if n > 0 {
				if upd.Groups == nil {
					upd.Groups = make(map[string]*laneCursor)
				}
				upd.Groups[string(m.Group)] = &lc
				matched += n
				changed = true
			}
		}
	}
	if !known && !changed {
		return nil // nothing matched for a device we do not track
	}
	doc, err := s.updateCursor(ctx, a, user, func(d *cursorDoc) bool {
		c := d.Devices[string(device)]
		if c == nil {
			if known {
				return false // forgotten meanwhile
			}
			c = &deviceCursor{}
			d.Devices[string(device)] = c
		}
		c.merge(upd)
		return true
	})
	if err != nil {
		return err
	}
	local := s.local(user, device)
	for _, ss := range local {
		ss.Ack(ids...)
	}
	if len(local) == 0 {
		// A session here counts the acks it applies itself.
		s.metrics.acks.Add(float64(matched))
	}
	return s.purgeWait(ctx, a, user, doc)
}

// ackScan walks the messages of subj after cur and returns cur with the
// ones whose id is in want acked (marking those ids matched), and how many
// it acked: the floor advances over a contiguous run of acked messages
// (skip: messages that need no ack), later matches are recorded above it.
// It reads at most MaxPerUser messages.
func (s *Service) ackScan(ctx context.Context, stream, subj string, cur laneCursor, want map[string]bool, skip func(*jetstream.RawStreamMsg) bool) (laneCursor, int, error) {
	upd := laneCursor{Floor: cur.Floor}
	contiguous := true
	var scanned int64
	matched := 0
	_, err := s.scan(ctx, stream, subj, cur.Floor+1, 256, func(m *jetstream.RawStreamMsg) bool {
		scanned++
		acked := false
		if _, ok := slices.BinarySearch(cur.Acked, m.Sequence); ok || (skip != nil && skip(m)) {
			acked = true
		} else if msg, err := schema.UnmarshalProto(m.Data); err == nil {
			if _, acked = want[msg.ID]; acked {
				want[msg.ID] = true
				matched++
				if !contiguous {
					upd.Acked = append(upd.Acked, m.Sequence)
				}
			}
		}
		switch {
		case acked && contiguous:
			upd.Floor = m.Sequence
		case !acked:
			contiguous = false
		}
		return scanned < s.cfg.MaxPerUser
	})
	if err != nil {
		return cur, 0, err
	}
	upd.merge(&laneCursor{Acked: cur.Acked})
	return upd, matched, nil
}
