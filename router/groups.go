package router

import (
	"context"
	"errors"
	"fmt"

	"github.com/vartalap/vartalap/schema"
)

var (
	errUnknownGroup = errors.New("unknown group")
	errNotMember    = errors.New("sender is not a member")
)

// groupCache remembers membership lookups within one batch, so a batch of
// messages to one group asks the groups service once.
type groupCache map[schema.GroupID]*groupEntry

type groupEntry struct {
	members []schema.UserID
	err     error
	// set holds the members, made on the first membership check.
	set map[schema.UserID]struct{}
	// rcpts caches the recipient list per sender.
	rcpts map[schema.UserID][]schema.UserID
}

// members returns the members of g. The error is errUnknownGroup when the
// group does not exist (or no lister is configured), another error when the
// lookup failed and may succeed later.
func (r *Router) members(ctx context.Context, cache groupCache, g schema.GroupID) (*groupEntry, error) {
	if e, ok := cache[g]; ok {
		return e, e.err
	}
	e := &groupEntry{}
	if r.groups == nil {
		e.err = errUnknownGroup
	} else {
		lctx, cancel := context.WithTimeout(ctx, opTimeout)
		e.members, e.err = r.groups.Members(lctx, g)
		cancel()
		switch {
		case errors.Is(e.err, ErrNoGroup):
			e.err = errUnknownGroup
		case e.err != nil:
			e.err = fmt.Errorf("members of %s: %w", g, e.err)
		}
	}
	if cache != nil {
		cache[g] = e
	}
	return e, e.err
}

// recipients returns every member of g except sender, each once, in member
// order. The error is errNotMember if sender is not a member.
func (r *Router) recipients(ctx context.Context, cache groupCache, g schema.GroupID, sender schema.UserID) ([]schema.UserID, error) {
	e, err := r.members(ctx, cache, g)
	if err != nil {
		return nil, err
	}
	if rc, ok := e.rcpts[sender]; ok {
		if rc == nil {
			return nil, errNotMember
		}
		return rc, nil
	}
	seen := make(map[schema.UserID]struct{}, len(e.members))
	rcpts := make([]schema.UserID, 0, len(e.members))
	member := false
	for _, u := range e.members {
		if u == sender {
			member = true
			continue
		}
		if _, dup := seen[u]; dup {
			continue
		}
		seen[u] = struct{}{}
		if !u.Valid() {
			r.log.Warn("invalid member id skipped", "group", g)
			continue
		}
		rcpts = append(rcpts, u)
	}
	if !member {
		rcpts = nil
	}
	if e.rcpts == nil {
		e.rcpts = make(map[schema.UserID][]schema.UserID)
	}
	e.rcpts[sender] = rcpts
	if !member {
		return nil, errNotMember
	}
	return rcpts, nil
}

// checkMember returns nil if sender is a member of g, errNotMember if not,
// or the lookup's error.
func (r *Router) checkMember(ctx context.Context, cache groupCache, g schema.GroupID, sender schema.UserID) error {
	e, err := r.members(ctx, cache, g)
	if err != nil {
		return err
	}
	if e.set == nil {
		e.set = make(map[schema.UserID]struct{}, len(e.members))
		for _, u := range e.members {
			e.set[u] = struct{}{}
		}
	}
	if _, ok := e.set[sender]; !ok {
		return errNotMember
	}
	return nil
}
