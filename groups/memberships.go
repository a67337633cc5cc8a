package groups

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/internal/directget"
	"github.com/vartalap/vartalap/schema"
)

// Statuses of a Direct Get reply without a message.
const (
	statusHeader     = "Status"
	descHeader       = "Description"
	statusNoMessages = "404"
)

// maxMultiLastKeys is the most exact keys asked for in one multi_last
// request: the server answers at most 1,024 subjects per request.
const maxMultiLastKeys = 1024

// epochs returns the membership epochs of an index value, oldest first. A
// value written before epochs existed stands for one open epoch from the
// start of the group's log.
func (v indexValue) epochs() []schema.Epoch {
	if len(v.Epochs) == 0 {
		return []schema.Epoch{{Since: 0}}
	}
	return v.Epochs
}

// closed reports whether the last epoch of v has ended (the user was
// removed).
func (v indexValue) closed() bool {
	eps := v.epochs()
	return !eps[len(eps)-1].Open()
}

// joined returns the epochs of a user added when the group's log ended at
// since: the closed epochs of prev (its index value before, if any) and a
// new open one, at most maxEpochs, the oldest dropped. An open last epoch
// of prev belongs to no membership (the user is not a member) and cannot
// be trusted, so it is dropped rather than extended.
func joined(prev *indexValue, since uint64) []schema.Epoch {
	var eps []schema.Epoch
	if prev != nil {
		for _, e := range prev.epochs() {
			if !e.Open() {
				eps = append(eps, e)
			}
		}
	}
	eps = append(eps, schema.Epoch{Since: since})
	if len(eps) > maxEpochs {
		eps = eps[len(eps)-maxEpochs:]
	}
	return eps
}

// left returns the index value of a member removed at until (the first
// GROUP_LOG sequence after the removal) at removedOn (ms): prev with its
// last epoch closed. A member without an index value (never written by
// this package) is treated like an old value: one epoch from 0.
func left(prev *indexValue, gid schema.GroupID, until uint64, removedOn int64) indexValue {
	v := indexValue{GroupID: gid, AddedOn: removedOn}
	if prev != nil {
		v = *prev
	}
	v.Epochs = slices.Clone(v.epochs())
	if last := &v.Epochs[len(v.Epochs)-1]; last.Open() {
		last.Until = max(until, last.Since+1)
	}
	v.RemovedOn = removedOn
	return v
}

// decodeIndex decodes a stored u.<user>.g.<gid> message. It returns the
// group id from the key and false for a purge marker or a key that is not
// an index key.
func decodeIndex(m *jetstream.RawStreamMsg) (schema.GroupID, indexValue, bool, error) {
	if isMarker(m.Header) {
		return "", indexValue{}, false, nil
	}
	id, err := schema.ParseToken(m.Subject[strings.LastIndexByte(m.Subject, '.')+1:])
	if err != nil || !schema.GroupID(id).Valid() {
		return "", indexValue{}, false, nil
	}
	var v indexValue
	if err := json.Unmarshal(m.Data, &v); err != nil {
		return "", indexValue{}, false, fmt.Errorf("decode %s: %w", m.Subject, err)
	}
	return schema.GroupID(id), v, true, nil
}

// indexMsgs returns the stored index keys of u: one multi_last request, or
// paged Direct Gets when they exceed one request.
func (s *Service) indexMsgs(ctx context.Context, u schema.UserID) ([]*jetstream.RawStreamMsg, error) {
	msgs, err := s.lastMsgs(ctx, indexFilter(u))
	if errors.Is(err, errTooManySubjects) {
		msgs, err = s.scanMsgs(ctx, indexFilter(u))
	}
	return msgs, err
}

// indexValues returns the current index values of users in gid, by user;
// users without one (or with a purge marker) are absent. One multi_last
// request of the exact keys per 1,024 users.
func (s *Service) indexValues(ctx context.Context, gid schema.GroupID, users []schema.UserID) (map[schema.UserID]*indexValue, error) {
	byKey := make(map[string]schema.UserID, len(users))
	keys := make([]string, len(users))
	for i, u := range users {
		keys[i] = kvPrefix + indexKey(u, gid)
		byKey[keys[i]] = u
	}
	out := make(map[schema.UserID]*indexValue, len(users))
	for chunk := range slices.Chunk(keys, maxMultiLastKeys) {
		msgs, err := s.lastMsgs(ctx, chunk...)
		if err != nil {
			return nil, fmt.Errorf("index values of group %s: %w", gid, err)
		}
		for _, m := range msgs {
			u, ok := byKey[m.Subject]
			if !ok {
				continue
			}
			_, v, ok, err := decodeIndex(m)
			if err != nil {
				return nil, fmt.Errorf("index values of group %s: %w", gid, err)
			}
			if ok {
				out[u] = &v
			}
		}
	}
	return out, nil
}

// lastLogSeq returns the sequence of the last message on gid's GROUP_LOG
// subject, 0 when it has none, with one Direct Get (last_by_subj). Any
// other outcome (GROUP_LOG missing, a timeout) is an error: a guessed
// sequence could show a new member the group's history.
func (s *Service) lastLogSeq(ctx context.Context, gid schema.GroupID) (uint64, error) {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	subj := schema.GroupLog(gid)
	req, err := json.Marshal(struct {
		LastFor string `json:"last_by_subj"`
	}{subj})
	if err != nil {
		return 0, fmt.Errorf("last of %s: %w", subj, err)
	}
	msg, err := s.js.Conn().RequestWithContext(ctx, directget.APIPrefix(s.js)+"DIRECT.GET."+schema.StreamGroupLog, req)
	if errors.Is(err, nats.ErrNoResponders) {
		return 0, fmt.Errorf("last of %s: stream %s unavailable: %w", subj, schema.StreamGroupLog, err)
	}
	if err != nil {
		return 0, fmt.Errorf("last of %s: %w", subj, err)
	}
	if st := msg.Header.Get(statusHeader); st != "" && len(msg.Data) == 0 {
		if st == statusNoMessages {
			return 0, nil
		}
		return 0, fmt.Errorf("last of %s: direct get status %s %s", subj, st, msg.Header.Get(descHeader))
	}
	if got := msg.Header.Get(jetstream.SubjectHeader); got != subj {
		return 0, fmt.Errorf("last of %s: direct get answered subject %q", subj, got)
	}
	seq, err := strconv.ParseUint(msg.Header.Get(jetstream.SequenceHeader), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("last of %s: bad %s header: %w", subj, jetstream.SequenceHeader, err)
	}
	return seq, nil
}

// Memberships returns u's memberships, open and closed, sorted by group id:
// which messages of each group's GROUP_LOG subject u may receive. Closed
// memberships removed longer than Config.Retention ago are left out (their
// messages have expired). An invalid u is an error wrapping
// schema.ErrInvalidID; a user in no group gets an empty slice.
//
// It reads only u's reverse index (one multi_last Direct Get, paged when
// it exceeds one request) and trusts it: every index value is written in
// the same atomic batch as the membership it describes, together with the
// group's meta CAS (see commit).
func (s *Service) Memberships(ctx context.Context, u schema.UserID) ([]schema.Membership, error) {
	if !u.Valid() {
		return nil, fmt.Errorf("memberships of %q: %w", u, schema.ErrInvalidID)
	}
	msgs, err := s.indexMsgs(ctx, u)
	if err != nil {
		return nil, fmt.Errorf("memberships of %s: %w", u, err)
	}
	cutoff := s.now().Add(-s.retention).UnixMilli()
	out := make([]schema.Membership, 0, len(msgs))
	for _, m := range msgs {
		gid, v, ok, err := decodeIndex(m)
		if err != nil {
			return nil, fmt.Errorf("memberships of %s: %w", u, err)
		}
		if !ok || (v.closed() && v.RemovedOn != 0 && v.RemovedOn < cutoff) {
			continue
		}
		out = append(out, schema.Membership{Group: gid, Epochs: slices.Clone(v.epochs())})
	}
	slices.SortFunc(out, func(a, b schema.Membership) int { return strings.Compare(string(a.Group), string(b.Group)) })
	return out, nil
}
