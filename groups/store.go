package groups

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"

	"github.com/vartalap/vartalap/internal/directget"
	"github.com/vartalap/vartalap/schema"
)

// Names of the bucket's stream and subjects.
const (
	kvStream    = "KV_" + schema.BucketGroups
	kvPrefix    = "$KV." + schema.BucketGroups + "."
	kvOpHeader  = "KV-Operation"
	kvOpDelete  = "DEL"
	kvOpPurge   = "PURGE"
	scanPage    = 1000 // messages per page of a paged Direct Get scan
	scanRetries = 5    // paged member scans retried when the meta moved
)

// errTooManySubjects means a multi_last Direct Get matched more than the
// server's 1,024 subjects (status 413, which jetstreamext reports as
// ErrBatchUnsupported).
var errTooManySubjects = errors.New("too many subjects for one multi_last request")

// errConflict means a membership change lost the compare-and-set on the
// group's meta key.
var errConflict = errors.New("group changed concurrently")

// metaValue is the value of g.<gid>.meta.
type metaValue struct {
	GroupID    schema.GroupID `json:"groupId"`
	Name       string         `json:"name"`
	ProfilePic *string        `json:"profilePic"`
	AddedOn    int64          `json:"addedOn"` // ms since epoch
	CreatedBy  schema.UserID  `json:"createdBy"`
	NextJoin   uint64         `json:"nextJoin"` // join sequence of the next member
}

// memberValue is the value of g.<gid>.m.<user>.
type memberValue struct {
	Username schema.UserID `json:"username"`
	Role     string        `json:"role"`
	AddedOn  int64         `json:"addedOn"` // ms since epoch
	Join     uint64        `json:"join"`    // per-group join sequence: lower joined earlier
}

// indexValue is the value of u.<user>.g.<gid>: the user's membership
// epochs in the group. It stays after a removal (last epoch closed) until
// it expires, Config.Retention later.
type indexValue struct {
	GroupID schema.GroupID `json:"groupId"`
	AddedOn int64          `json:"addedOn"` // ms since epoch, of the latest add
	// Epochs are the membership periods in GROUP_LOG sequences, oldest
	// first, at most maxEpochs; see epochs for values without any.
	Epochs []schema.Epoch `json:"epochs,omitempty"`
	// RemovedOn is when the last epoch was closed (ms since epoch), 0
	// while the user is a member.
	RemovedOn int64 `json:"removedOn,omitempty"`
}

// group is a consistent snapshot of one group.
type group struct {
	meta    metaValue
	metaRev uint64        // stream sequence of the meta key: the CAS revision
	members []memberValue // in join order
}

func (g *group) member(u schema.UserID) (memberValue, bool) {
	for _, m := range g.members {
		if m.Username == u {
			return m, true
		}
	}
	return memberValue{}, false
}

func (g *group) admins() int {
	n := 0
	for _, m := range g.members {
		if m.Role == RoleAdmin {
			n++
		}
	}
	return n
}

func (g *group) usernames() []schema.UserID {
	out := make([]schema.UserID, len(g.members))
	for i, m := range g.members {
		out[i] = m.Username
	}
	return out
}

// Keys. Ids must have passed Valid.
func metaKey(g schema.GroupID) string { return "g." + schema.Token(g) + ".meta" }
func memberKey(g schema.GroupID, u schema.UserID) string {
	return "g." + schema.Token(g) + ".m." + schema.Token(u)
}
func membersFilter(g schema.GroupID) string { return kvPrefix + "g." + schema.Token(g) + ".m.*" }
func indexKey(u schema.UserID, g schema.GroupID) string {
	return "u." + schema.Token(u) + ".g." + schema.Token(g)
}
func indexFilter(u schema.UserID) string { return kvPrefix + "u." + schema.Token(u) + ".g.*" }

// isMarker reports whether a stored KV message is a delete or purge marker.
func isMarker(h nats.Header) bool {
	op := h.Get(kvOpHeader)
	return op == kvOpDelete || op == kvOpPurge
}

// lastMsgs returns the last message of every subject matching filters in
// one multi_last Direct Get: an isolated snapshot that creates no consumer.
// More than 1,024 subjects is errTooManySubjects.
func (s *Service) lastMsgs(ctx context.Context, filters ...string) ([]*jetstream.RawStreamMsg, error) {
	msgs, err := directget.LastMsgs(ctx, s.js, kvStream, filters, opTimeout)
	if errors.Is(err, directget.ErrTooManySubjects) {
		return nil, errTooManySubjects
	}
	return msgs, err
}

// scanMsgs returns every message on subjects matching filter with paged
// batched Direct Gets. With History 1 that is the last message of each
// subject. Pages are not one snapshot; see loadPaged.
func (s *Service) scanMsgs(ctx context.Context, filter string) ([]*jetstream.RawStreamMsg, error) {
	var all []*jetstream.RawStreamMsg
	_, err := directget.Scan(ctx, s.js, kvStream, filter, 1, scanPage, opTimeout, func(m *jetstream.RawStreamMsg) bool {
		all = append(all, m)
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("scan %s: %w", filter, err)
	}
	return all, nil
}

// load returns a consistent snapshot of group gid, or ErrNotFound.
func (s *Service) load(ctx context.Context, gid schema.GroupID) (*group, error) {
	if !gid.Valid() {
		return nil, ErrNotFound
	}
	msgs, err := s.lastMsgs(ctx, kvPrefix+metaKey(gid), membersFilter(gid))
	if errors.Is(err, errTooManySubjects) {
		return s.loadPaged(ctx, gid)
	}
	if err != nil {
		return nil, err
	}
	return parseGroup(gid, msgs)
}

// loadPaged loads a group whose keys exceed one multi_last request. Every
// membership change rewrites the meta key in the same atomic batch, so an
// unchanged meta revision before and after the scan proves the scan saw one
// state.
func (s *Service) loadPaged(ctx context.Context, gid schema.GroupID) (*group, error) {
	metaSubj := kvPrefix + metaKey(gid)
	for range scanRetries {
		before, err := s.lastMsgs(ctx, metaSubj)
		if err != nil {
			return nil, err
		}
		members, err := s.scanMsgs(ctx, membersFilter(gid))
		if err != nil {
			return nil, err
		}
		after, err := s.lastMsgs(ctx, metaSubj)
		if err != nil {
			return nil, err
		}
		if len(before) != len(after) || (len(before) == 1 && before[0].Sequence != after[0].Sequence) {
			continue
		}
		return parseGroup(gid, append(before, members...))
	}
	return nil, fmt.Errorf("load group %s: %w", gid, errTooContended)
}

// parseGroup builds a snapshot from the stored messages of one group.
func parseGroup(gid schema.GroupID, msgs []*jetstream.RawStreamMsg) (*group, error) {
	g := &group{}
	metaSubj := kvPrefix + metaKey(gid)
	found := false
	for _, m := range msgs {
		if isMarker(m.Header) {
			continue
		}
		if m.Subject == metaSubj {
			if err := json.Unmarshal(m.Data, &g.meta); err != nil {
				return nil, fmt.Errorf("decode %s: %w", m.Subject, err)
			}
			g.metaRev = m.Sequence
			found = true
			continue
		}
		var mv memberValue
		if err := json.Unmarshal(m.Data, &mv); err != nil {
			return nil, fmt.Errorf("decode %s: %w", m.Subject, err)
		}
		g.members = append(g.members, mv)
	}
	if !found {
		// Members without meta are leftovers of a deleted group.
		return nil, ErrNotFound
	}
	slices.SortFunc(g.members, func(a, b memberValue) int {
		if a.Join != b.Join {
			if a.Join < b.Join {
				return -1
			}
			return 1
		}
		return strings.Compare(string(a.Username), string(b.Username))
	})
	return g, nil
}

// userGroups returns the groups u is a member of, oldest first. Index
// entries whose last epoch is closed (u was removed) are skipped without
// reading the group; the others are still checked against the group's
// members (a group deleted while too large for one atomic batch may leave
// index keys behind for a moment).
func (s *Service) userGroups(ctx context.Context, u schema.UserID) ([]*group, error) {
	msgs, err := s.indexMsgs(ctx, u)
	if err != nil {
		return nil, fmt.Errorf("groups of %s: %w", u, err)
	}
	var out []*group
	for _, m := range msgs {
		id, v, ok, err := decodeIndex(m)
		if err != nil {
			return nil, fmt.Errorf("groups of %s: %w", u, err)
		}
		if !ok || v.closed() {
			continue
		}
		g, err := s.load(ctx, id)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("groups of %s: %w", u, err)
		}
		if _, ok := g.member(u); ok {
			out = append(out, g)
		}
	}
	slices.SortFunc(out, func(a, b *group) int {
		if a.meta.AddedOn != b.meta.AddedOn {
			if a.meta.AddedOn < b.meta.AddedOn {
				return -1
			}
			return 1
		}
		return strings.Compare(string(a.meta.GroupID), string(b.meta.GroupID))
	})
	return out, nil
}

// kvWrite is one key written by a change: a value, or a purge when value
// is nil. A value with a ttl expires (the key disappears) after it.
type kvWrite struct {
	key   string
	value []byte
	ttl   time.Duration
}

// change is what one membership operation writes, atomically.
type change struct {
	meta   *metaValue // new meta value; nil purges the meta (group deleted)
	writes []kvWrite
	noop   bool // nothing to write
}

func putJSON(key string, v any) kvWrite {
	b, err := json.Marshal(v)
	if err != nil {
		panic("groups: marshal " + key + ": " + err.Error()) // plain structs always marshal
	}
	return kvWrite{key: key, value: b}
}

func purgeMsg(key string) *nats.Msg {
	m := nats.NewMsg(kvPrefix + key)
	m.Header.Set(kvOpHeader, kvOpPurge)
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	m.Header.Set(jetstream.MsgTTLHeader, markerTTL.String())
	return m
}

// commit writes ch as one atomic batch whose first message replaces the
// meta key of gid only if it is still at revision metaRev (0: absent).
// Every membership key and the index key that goes with it are written in
// the same batch (all or nothing), which is why Memberships may trust the
// index alone.
func (s *Service) commit(ctx context.Context, gid schema.GroupID, metaRev uint64, ch change) error {
	if len(ch.writes)+1 > maxAtomicBatch {
		return fmt.Errorf("commit group %s: %d writes exceed one batch", gid, len(ch.writes)+1)
	}
	msgs := make([]*nats.Msg, 0, len(ch.writes)+1)
	var first *nats.Msg
	if ch.meta == nil {
		first = purgeMsg(metaKey(gid))
	} else {
		w := putJSON(metaKey(gid), ch.meta)
		first = &nats.Msg{Subject: kvPrefix + w.key, Data: w.value, Header: nats.Header{}}
	}
	first.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(metaRev, 10))
	msgs = append(msgs, first)
	for _, w := range ch.writes {
		switch {
		case w.value == nil:
			msgs = append(msgs, purgeMsg(w.key))
		case w.ttl > 0:
			m := nats.NewMsg(kvPrefix + w.key)
			m.Data = w.value
			m.Header.Set(jetstream.MsgTTLHeader, w.ttl.String())
			msgs = append(msgs, m)
		default:
			msgs = append(msgs, &nats.Msg{Subject: kvPrefix + w.key, Data: w.value})
		}
	}
	err := s.publishAtomic(ctx, msgs)
	if isRetryable(err) {
		return errConflict
	}
	if err != nil {
		return fmt.Errorf("commit group %s: %w", gid, err)
	}
	return nil
}

// publishAtomic publishes msgs (at most maxAtomicBatch) as one atomic batch.
func (s *Service) publishAtomic(ctx context.Context, msgs []*nats.Msg) error {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	bp, err := jetstreamext.NewBatchPublisher(s.js)
	if err != nil {
		return fmt.Errorf("new batch: %w", err)
	}
	for _, m := range msgs[:len(msgs)-1] {
		if err := bp.AddMsg(m); err != nil {
			_ = bp.Discard()
			return fmt.Errorf("batch add %s: %w", m.Subject, err)
		}
	}
	if _, err := bp.CommitMsg(ctx, msgs[len(msgs)-1]); err != nil {
		return fmt.Errorf("batch commit: %w", err)
	}
	return nil
}

// isRetryable reports whether a batch failed because of a concurrent change
// (wrong last subject sequence) or because too many batches were in flight.
func isRetryable(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	switch apiErr.ErrorCode {
	case jetstream.JSErrCodeStreamWrongLastSequence, jetstream.JSErrCodeStreamWrongLastSequenceConstant,
		jetstreamext.JSErrCodeAtomicPublishTooManyInflight:
		return true
	}
	return false
}

// mutate applies plan to the current state of gid and commits the result
// with a CAS on the meta key, retrying with a fresh snapshot when another
// change won. It returns the snapshot the committed change was planned on.
//
// Changes of one group are also serialised within this process (a striped
// lock), so concurrent requests queue instead of repeatedly losing the CAS:
// each atomic batch on a file-backed R1 stream stages through a temporary
// store and costs milliseconds. The CAS still arbitrates between processes.
func (s *Service) mutate(ctx context.Context, gid schema.GroupID, plan func(g *group) (change, error)) (*group, change, error) {
	if !gid.Valid() {
		return nil, change{}, ErrNotFound
	}
	unlock, err := s.lockGroup(ctx, gid)
	if err != nil {
		return nil, change{}, fmt.Errorf("change group %s: %w", gid, err)
	}
	defer unlock()
	for attempt := range maxCASAttempts {
		g, err := s.load(ctx, gid)
		if err != nil {
			return nil, change{}, err
		}
		ch, err := plan(g)
		if err != nil || ch.noop {
			return g, ch, err
		}
		err = s.commit(ctx, gid, g.metaRev, ch)
		if !errors.Is(err, errConflict) {
			return g, ch, err
		}
		// Lost the race: back off a little, with jitter, and re-plan.
		d := time.Duration(rand.Int64N(int64(min(attempt+1, 20)) * int64(time.Millisecond)))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, change{}, fmt.Errorf("change group %s: %w", gid, ctx.Err())
		case <-t.C:
		}
	}
	return nil, change{}, fmt.Errorf("change group %s: %w", gid, errTooContended)
}

// lockGroup takes the process-local lock stripe of gid.
func (s *Service) lockGroup(ctx context.Context, gid schema.GroupID) (func(), error) {
	h := fnv.New32a()
	_, _ = h.Write([]byte(gid))
	stripe := s.stripes[h.Sum32()%uint32(len(s.stripes))]
	select {
	case stripe <- struct{}{}:
		return func() { <-stripe }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Members returns the members of group g in join order, or ErrNotFound
// (wrapped) when it does not exist. It implements the router's
// MemberLister: one multi_last Direct Get, no consumer.
//
// The router calls it for every group message, so member lists are cached
// per group under the revision of the group's meta key: every membership
// change rewrites that key in the same atomic batch, so a cached list whose
// revision still matches is the current one. A call then costs one Direct
// Get of the meta key instead of reading every member key.
func (s *Service) Members(ctx context.Context, g schema.GroupID) ([]schema.UserID, error) {
	if !g.Valid() {
		return nil, fmt.Errorf("members of %s: %w", g, ErrNotFound)
	}
	meta, err := s.lastMsgs(ctx, kvPrefix+metaKey(g))
	if err != nil {
		return nil, fmt.Errorf("members of %s: %w", g, err)
	}
	if len(meta) == 1 && !isMarker(meta[0].Header) {
		if users, ok := s.members.get(g, meta[0].Sequence); ok {
			return users, nil
		}
	}
	grp, err := s.load(ctx, g)
	if err != nil {
		return nil, fmt.Errorf("members of %s: %w", g, err)
	}
	users := grp.usernames()
	s.members.put(g, grp.metaRev, users)
	return slices.Clone(users), nil
}

// memberCache maps a group to its member list at one meta revision.
type memberCache struct {
	mu sync.Mutex
	m  map[schema.GroupID]cachedMembers
}

type cachedMembers struct {
	rev   uint64
	users []schema.UserID
}

// memberCacheSize bounds the cache; when full, an arbitrary entry goes.
const memberCacheSize = 4096

func (c *memberCache) get(g schema.GroupID, rev uint64) ([]schema.UserID, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[g]
	if !ok || e.rev != rev {
		return nil, false
	}
	return slices.Clone(e.users), true
}

func (c *memberCache) put(g schema.GroupID, rev uint64, users []schema.UserID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[schema.GroupID]cachedMembers)
	}
	if _, ok := c.m[g]; !ok && len(c.m) >= memberCacheSize {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[g] = cachedMembers{rev: rev, users: users}
}

// createGroup stores a new group. members must be valid, de-duplicated and
// must not contain creator.
func (s *Service) createGroup(ctx context.Context, creator schema.UserID, name string, pic *string, members []schema.UserID) (*group, error) {
	now := s.now().UnixMilli()
	gid := schema.GroupID(newUUID())
	g := &group{meta: metaValue{
		GroupID:    gid,
		Name:       name,
		ProfilePic: pic,
		AddedOn:    now,
		CreatedBy:  creator,
	}}
	all := append([]schema.UserID{creator}, members...)
	if len(all) > s.maxMembers {
		return nil, errMemberLimit
	}
	// The id is new, so its log subject is empty: the read mostly checks
	// that GROUP_LOG answers, as for add.
	since, err := s.lastLogSeq(ctx, gid)
	if err != nil {
		return nil, fmt.Errorf("create group %s: %w", gid, err)
	}
	var writes []kvWrite
	for i, u := range all {
		role := RoleUser
		if i == 0 {
			role = RoleAdmin
		}
		mv := memberValue{Username: u, Role: role, AddedOn: now, Join: uint64(i + 1)}
		g.members = append(g.members, mv)
		iv := indexValue{GroupID: gid, AddedOn: now, Epochs: joined(nil, since)}
		writes = append(writes, putJSON(indexKey(u, gid), iv), putJSON(memberKey(gid, u), mv))
	}
	g.meta.NextJoin = uint64(len(all) + 1)
	if err := s.commit(ctx, gid, 0, change{meta: &g.meta, writes: writes}); err != nil {
		return nil, err
	}
	return g, nil
}

// addMembers adds users (valid, de-duplicated) to gid as role user. It
// returns the snapshot before the change and the members added.
//
// Each new member's epoch starts at the last sequence of the group's log
// when the change is planned, read once per attempt; a user added before
// keeps its closed epochs. Both reads come after the snapshot, so a change
// committed in between makes the meta CAS fail and the plan is redone.
func (s *Service) addMembers(ctx context.Context, actor schema.UserID, gid schema.GroupID, users []schema.UserID) (*group, []memberValue, error) {
	var added []memberValue
	before, _, err := s.mutate(ctx, gid, func(g *group) (change, error) {
		added = added[:0]
		if _, ok := g.member(actor); !ok {
			return change{}, ErrNotFound
		}
		var fresh []schema.UserID
		for _, u := range users {
			if _, ok := g.member(u); !ok {
				fresh = append(fresh, u)
			}
		}
		if len(fresh) == 0 {
			return change{noop: true}, nil
		}
		if len(g.members)+len(fresh) > s.maxMembers {
			return change{}, errMemberLimit
		}
		since, err := s.lastLogSeq(ctx, gid)
		if err != nil {
			return change{}, fmt.Errorf("add to group %s: %w", gid, err)
		}
		prev, err := s.indexValues(ctx, gid, fresh)
		if err != nil {
			return change{}, fmt.Errorf("add to group %s: %w", gid, err)
		}
		now := s.now().UnixMilli()
		meta := g.meta
		writes := make([]kvWrite, 0, 2*len(fresh))
		for _, u := range fresh {
			mv := memberValue{Username: u, Role: RoleUser, AddedOn: now, Join: meta.NextJoin}
			meta.NextJoin++
			added = append(added, mv)
			iv := indexValue{GroupID: gid, AddedOn: now, Epochs: joined(prev[u], since)}
			writes = append(writes, putJSON(indexKey(u, gid), iv), putJSON(memberKey(gid, u), mv))
		}
		return change{meta: &meta, writes: writes}, nil
	})
	if err != nil {
		return nil, nil, err
	}
	return before, added, nil
}

// removal is the outcome of removeMember.
type removal struct {
	removed  bool         // target was a member and is gone
	promoted *memberValue // the member that became admin, if any
}

// removeMember removes target from gid. A member may remove itself; only
// an admin may remove others. When the last admin goes, the longest-standing
// remaining member becomes admin; when the last member goes, the group is
// deleted (its keys purged, as by deleteGroup).
//
// The target's index key is rewritten with its last epoch closed at the
// last sequence of the group's log + 1 (read once per attempt), and
// expires Config.Retention later.
func (s *Service) removeMember(ctx context.Context, actor, target schema.UserID, gid schema.GroupID) (*group, removal, error) {
	var res removal
	before, _, err := s.mutate(ctx, gid, func(g *group) (change, error) {
		res = removal{}
		am, ok := g.member(actor)
		if !ok {
			return change{}, ErrNotFound
		}
		if target != actor && am.Role != RoleAdmin {
			return change{}, errForbidden
		}
		tm, ok := g.member(target)
		if !ok {
			return change{noop: true}, nil
		}
		res.removed = true
		if len(g.members) == 1 {
			// The last member leaves: the group goes with it.
			return change{meta: nil, writes: []kvWrite{{key: memberKey(gid, target)}, {key: indexKey(target, gid)}}}, nil
		}
		last, err := s.lastLogSeq(ctx, gid)
		if err != nil {
			return change{}, fmt.Errorf("remove from group %s: %w", gid, err)
		}
		prev, err := s.indexValues(ctx, gid, []schema.UserID{target})
		if err != nil {
			return change{}, fmt.Errorf("remove from group %s: %w", gid, err)
		}
		tomb := putJSON(indexKey(target, gid), left(prev[target], gid, last+1, s.now().UnixMilli()))
		tomb.ttl = s.retention
		writes := []kvWrite{{key: memberKey(gid, target)}, tomb}
		if tm.Role == RoleAdmin && g.admins() == 1 {
			for _, m := range g.members { // join order: the first other member has stood longest
				if m.Username != target {
					m.Role = RoleAdmin
					res.promoted = &m
					writes = append(writes, putJSON(memberKey(gid, m.Username), m))
					break
				}
			}
		}
		meta := g.meta
		return change{meta: &meta, writes: writes}, nil
	})
	if err != nil {
		return nil, removal{}, err
	}
	return before, res, nil
}

// metaUpdate is a PATCH of a group's name and picture; nil fields stay.
type metaUpdate struct {
	name *string
	pic  *string // "" clears the picture
}

// updateMeta changes name and/or picture (admins only). It returns the
// group after the change and the fields that actually changed.
func (s *Service) updateMeta(ctx context.Context, actor schema.UserID, gid schema.GroupID, up metaUpdate) (*group, metaUpdate, error) {
	var changed metaUpdate
	before, ch, err := s.mutate(ctx, gid, func(g *group) (change, error) {
		changed = metaUpdate{}
		m, ok := g.member(actor)
		if !ok {
			return change{}, ErrNotFound
		}
		if m.Role != RoleAdmin {
			return change{}, errForbidden
		}
		meta := g.meta
		if up.name != nil && *up.name != meta.Name {
			meta.Name = *up.name
			changed.name = up.name
		}
		if up.pic != nil && *up.pic != deref(meta.ProfilePic) {
			changed.pic = up.pic
			meta.ProfilePic = picPtr(*up.pic)
		}
		if changed.name == nil && changed.pic == nil {
			return change{noop: true}, nil
		}
		return change{meta: &meta}, nil
	})
	if err != nil {
		return nil, metaUpdate{}, err
	}
	if !ch.noop {
		if changed.name != nil {
			before.meta.Name = *changed.name
		}
		if changed.pic != nil {
			before.meta.ProfilePic = picPtr(*changed.pic)
		}
	}
	return before, changed, nil
}

func deref(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// picPtr is the stored form of a picture: nil when empty.
func picPtr(p string) *string {
	if p == "" {
		return nil
	}
	return &p
}

// setRole sets target's role (admins only). The last admin cannot be
// demoted. It reports whether the role changed.
func (s *Service) setRole(ctx context.Context, actor, target schema.UserID, gid schema.GroupID, role string) (*group, bool, error) {
	before, ch, err := s.mutate(ctx, gid, func(g *group) (change, error) {
		am, ok := g.member(actor)
		if !ok {
			return change{}, ErrNotFound
		}
		if am.Role != RoleAdmin {
			return change{}, errForbidden
		}
		tm, ok := g.member(target)
		if !ok {
			return change{}, errNotMember
		}
		if tm.Role == role {
			return change{noop: true}, nil
		}
		if tm.Role == RoleAdmin && g.admins() == 1 {
			return change{}, errLastAdmin
		}
		tm.Role = role
		meta := g.meta
		return change{meta: &meta, writes: []kvWrite{putJSON(memberKey(gid, target), tm)}}, nil
	})
	if err != nil {
		return nil, false, err
	}
	return before, !ch.noop, nil
}

// deleteGroup deletes gid (admins only). The meta key goes first, in one
// CAS, which makes the group disappear for every reader at once, together
// with the members' index keys as far as they fit in that atomic batch (all
// of them up to 999 members), so Memberships stops listing the group at
// once; member keys and any index keys left are purged afterwards. A
// failure in that clean-up is logged: leftovers are invisible to the REST
// API (no meta) and never reused (ids are random UUIDs). No tombstone is
// kept: undelivered messages of a deleted group are dropped.
func (s *Service) deleteGroup(ctx context.Context, actor schema.UserID, gid schema.GroupID) (*group, error) {
	before, _, err := s.mutate(ctx, gid, func(g *group) (change, error) {
		m, ok := g.member(actor)
		if !ok {
			return change{}, ErrNotFound
		}
		if m.Role != RoleAdmin {
			return change{}, errForbidden
		}
		var writes []kvWrite
		for _, m := range g.members[:min(len(g.members), maxAtomicBatch-1)] {
			writes = append(writes, kvWrite{key: indexKey(m.Username, gid)})
		}
		return change{meta: nil, writes: writes}, nil
	})
	if err != nil {
		return nil, err
	}
	msgs := make([]*nats.Msg, 0, 2*len(before.members))
	for i, m := range before.members {
		msgs = append(msgs, purgeMsg(memberKey(gid, m.Username)))
		if i >= maxAtomicBatch-1 {
			msgs = append(msgs, purgeMsg(indexKey(m.Username, gid)))
		}
	}
	for chunk := range slices.Chunk(msgs, maxAtomicBatch) {
		if err := s.publishAtomic(ctx, chunk); err != nil {
			s.log.Warn("group clean-up incomplete", "group", gid, "err", err)
			break
		}
	}
	return before, nil
}
