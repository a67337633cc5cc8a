package groups

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/go-chi/chi/v5"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// HTTP limits and error codes specific to this service.
const (
	maxBody         = 64 << 10
	codeMemberLimit = "member_limit"
	codeLastAdmin   = "last_admin"
	codeInvalidUser = "invalid_username"
)

// Routes registers the HTTP routes on r, without the /v1.0 prefix. Every
// route is served under both /groups and /group (the seed's nginx mapped
// both prefixes to the group service), and every route requires auth.
func (s *Service) Routes(r chi.Router) {
	for _, prefix := range []string{"/groups", "/group"} {
		r.Route(prefix, func(r chi.Router) {
			r.Use(api.RequireAuth(s.auth, s.log))
			r.Get("/", s.handleList)
			r.Get("/get", s.handleList) // legacy
			r.Post("/", s.handleCreate)
			r.Post("/create", s.handleCreate) // legacy
			r.Get("/{groupId}", s.handleGet)
			r.Patch("/{groupId}", s.handleUpdate)
			r.Delete("/{groupId}", s.handleDelete)
			r.Post("/{groupId}/members", s.handleAdd)
			r.Post("/{groupId}/add", s.handleAdd) // legacy
			r.Delete("/{groupId}/members", s.handleRemove)
			r.Post("/{groupId}/remove", s.handleRemove) // legacy
			r.Put("/{groupId}/members/{username}/role", s.handleRole)
		})
	}
}

// groupJSON is the seed's group shape.
type groupJSON struct {
	GroupID    schema.GroupID `json:"groupId"`
	Name       string         `json:"name"`
	Members    []memberJSON   `json:"members"`
	ProfilePic *string        `json:"profilePic"`
}

func toJSON(g *group) groupJSON {
	out := groupJSON{GroupID: g.meta.GroupID, Name: g.meta.Name, ProfilePic: g.meta.ProfilePic, Members: make([]memberJSON, len(g.members))}
	for i, m := range g.members {
		out.Members[i] = memberJSON{Username: m.Username, Role: m.Role}
	}
	return out
}

type statusJSON struct {
	Status bool `json:"status"`
}

// invalidUsersBody is the 400 body naming rejected usernames.
type invalidUsersBody struct {
	api.ErrorBody
	Invalid []string `json:"invalid"`
}

// identity returns the caller; RequireAuth guarantees it is set.
func identity(r *http.Request) schema.UserID {
	id, _ := api.IdentityFrom(r.Context())
	return id.User
}

// detached returns a context that survives the client going away, so a
// change that was committed still gets its events stored.
func detached(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(r.Context()), opTimeout)
}

func groupID(r *http.Request) schema.GroupID { return schema.GroupID(chi.URLParam(r, "groupId")) }

// decodeOptional decodes a JSON body into v; an empty body leaves v alone.
func decodeOptional(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			api.WriteError(w, http.StatusRequestEntityTooLarge, api.CodeTooLarge, "request body too large")
			return false
		}
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "unreadable body")
		return false
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return true
	}
	if err := json.Unmarshal(body, v); err != nil {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "malformed JSON body")
		return false
	}
	return true
}

// parseUsers validates and de-duplicates names (order kept), dropping
// except. On failure it writes 400 naming every invalid username.
func parseUsers(w http.ResponseWriter, names []string, except schema.UserID) ([]schema.UserID, bool) {
	seen := make(map[schema.UserID]bool, len(names))
	var out []schema.UserID
	var invalid []string
	for _, n := range names {
		u := schema.UserID(n)
		if !u.Valid() {
			invalid = append(invalid, n)
			continue
		}
		if u == except || seen[u] {
			continue
		}
		seen[u] = true
		out = append(out, u)
	}
	if len(invalid) > 0 {
		api.WriteJSON(w, http.StatusBadRequest, invalidUsersBody{
			ErrorBody: api.ErrorBody{Error: codeInvalidUser, Message: "invalid usernames: " + strings.Join(invalid, ", ")},
			Invalid:   invalid,
		})
		return nil, false
	}
	if len(out) > MaxMembersPerRequest {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "at most "+strconv.Itoa(MaxMembersPerRequest)+" members per request")
		return nil, false
	}
	return out, true
}

// validName reports whether name is 1 to MaxNameLen characters of valid
// UTF-8, not all white space.
func validName(name string) bool {
	return utf8.ValidString(name) && strings.TrimSpace(name) != "" && utf8.RuneCountInString(name) <= MaxNameLen
}

func validPic(p string) bool { return utf8.ValidString(p) && len(p) <= MaxProfilePicLen }

// writeErr maps a service error to the client, logging internal failures.
func (s *Service) writeErr(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, ErrNotFound):
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "group not found")
	case errors.Is(err, errForbidden):
		api.WriteError(w, http.StatusForbidden, api.CodeForbidden, "only an admin may do this")
	case errors.Is(err, errNotMember):
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "member not found")
	case errors.Is(err, errLastAdmin):
		api.WriteError(w, http.StatusConflict, codeLastAdmin, "the last admin cannot be demoted")
	case errors.Is(err, errMemberLimit):
		api.WriteError(w, http.StatusConflict, codeMemberLimit, "a group has at most "+strconv.Itoa(s.maxMembers)+" members")
	default:
		s.log.Error("group request error", "user", identity(r), "group", chi.URLParam(r, "groupId"), "path", r.URL.Path, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "group store unavailable")
	}
}

// emit stores events; on failure it answers 503 (the change itself is
// already committed) and returns false.
func (s *Service) emit(ctx context.Context, w http.ResponseWriter, gid schema.GroupID, actor schema.UserID, events ...event) bool {
	if err := s.publishEvents(ctx, gid, actor, events...); err != nil {
		s.log.Error("group events not stored", "group", gid, "user", actor, "action", events[0].action, "err", err)
		api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "the change was saved but its notifications could not be stored; members may not see it until they reload")
		return false
	}
	return true
}

func (s *Service) handleList(w http.ResponseWriter, r *http.Request) {
	gs, err := s.userGroups(r.Context(), identity(r))
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	out := make([]groupJSON, len(gs))
	for i, g := range gs {
		out[i] = toJSON(g)
	}
	api.WriteJSON(w, http.StatusOK, out)
}

func (s *Service) handleGet(w http.ResponseWriter, r *http.Request) {
	g, err := s.load(r.Context(), groupID(r))
	if err == nil {
		if _, ok := g.member(identity(r)); !ok {
			err = ErrNotFound
		}
	}
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	api.WriteJSON(w, http.StatusOK, toJSON(g))
}

type createRequest struct {
	Name       string   `json:"name"`
	Members    []string `json:"members"`
	ProfilePic *string  `json:"profilePic"`
}

func (s *Service) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req createRequest
	if !api.DecodeJSON(w, r, maxBody, &req) {
		return
	}
	if !validName(req.Name) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "name: required, at most "+strconv.Itoa(MaxNameLen)+" characters")
		return
	}
	if req.ProfilePic != nil && !validPic(*req.ProfilePic) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "profilePic: too long")
		return
	}
	actor := identity(r)
	members, ok := parseUsers(w, req.Members, actor)
	if !ok {
		return
	}
	ctx, cancel := detached(r)
	defer cancel()
	g, err := s.createGroup(ctx, actor, req.Name, picPtr(deref(req.ProfilePic)), members)
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	added := make([]memberJSON, len(g.members))
	for i, m := range g.members {
		added[i] = memberJSON{Username: m.Username, Role: m.Role}
	}
	if !s.emit(ctx, w, g.meta.GroupID, actor, event{action: actionAdd, body: addedBody{Added: added}, receivers: g.usernames()}) {
		return
	}
	api.WriteJSON(w, http.StatusOK, struct {
		GroupID schema.GroupID `json:"groupId"`
	}{g.meta.GroupID})
}

type addRequest struct {
	Members []string `json:"members"`
}

func (s *Service) handleAdd(w http.ResponseWriter, r *http.Request) {
	var req addRequest
	if !api.DecodeJSON(w, r, maxBody, &req) {
		return
	}
	members, ok := parseUsers(w, req.Members, "")
	if !ok {
		return
	}
	actor, gid := identity(r), groupID(r)
	ctx, cancel := detached(r)
	defer cancel()
	before, added, err := s.addMembers(ctx, actor, gid, members)
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	names := make([]schema.UserID, len(added))
	if len(added) > 0 {
		body := addedBody{Added: make([]memberJSON, len(added))}
		for i, m := range added {
			names[i] = m.Username
			body.Added[i] = memberJSON{Username: m.Username, Role: m.Role}
		}
		receivers := append(before.usernames(), names...)
		if !s.emit(ctx, w, gid, actor, event{action: actionAdd, body: body, receivers: receivers}) {
			return
		}
	}
	api.WriteJSON(w, http.StatusOK, struct {
		Status bool            `json:"status"`
		Added  []schema.UserID `json:"added"`
	}{true, names})
}

type removeRequest struct {
	Member string `json:"member"`
}

func (s *Service) handleRemove(w http.ResponseWriter, r *http.Request) {
	var req removeRequest
	if !decodeOptional(w, r, &req) {
		return
	}
	actor, gid := identity(r), groupID(r)
	target := actor
	if req.Member != "" {
		target = schema.UserID(req.Member)
		if !target.Valid() {
			api.WriteJSON(w, http.StatusBadRequest, invalidUsersBody{
				ErrorBody: api.ErrorBody{Error: codeInvalidUser, Message: "invalid usernames: " + req.Member},
				Invalid:   []string{req.Member},
			})
			return
		}
	}
	ctx, cancel := detached(r)
	defer cancel()
	before, res, err := s.removeMember(ctx, actor, target, gid)
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	if res.removed {
		events := []event{{action: actionRemove, body: removedBody{Removed: []schema.UserID{target}}, receivers: before.usernames()}}
		if res.promoted != nil {
			var rest []schema.UserID
			for _, u := range before.usernames() {
				if u != target {
					rest = append(rest, u)
				}
			}
			events = append(events, event{action: actionRole, body: roleBody{Username: res.promoted.Username, Role: RoleAdmin}, receivers: rest})
		}
		if !s.emit(ctx, w, gid, actor, events...) {
			return
		}
	}
	api.WriteJSON(w, http.StatusOK, statusJSON{Status: true})
}

type updateRequest struct {
	Name       *string `json:"name"`
	ProfilePic *string `json:"profilePic"`
}

func (s *Service) handleUpdate(w http.ResponseWriter, r *http.Request) {
	var req updateRequest
	if !api.DecodeJSON(w, r, maxBody, &req) {
		return
	}
	if req.Name != nil && !validName(*req.Name) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "name: 1 to "+strconv.Itoa(MaxNameLen)+" characters")
		return
	}
	if req.ProfilePic != nil && !validPic(*req.ProfilePic) {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "profilePic: too long")
		return
	}
	actor, gid := identity(r), groupID(r)
	ctx, cancel := detached(r)
	defer cancel()
	after, changed, err := s.updateMeta(ctx, actor, gid, metaUpdate{name: req.Name, pic: req.ProfilePic})
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	if changed.name != nil || changed.pic != nil {
		if !s.emit(ctx, w, gid, actor, event{action: actionUpdate, body: updateBody(changed), receivers: after.usernames()}) {
			return
		}
	}
	api.WriteJSON(w, http.StatusOK, toJSON(after))
}

type roleRequest struct {
	Role string `json:"role"`
}

func (s *Service) handleRole(w http.ResponseWriter, r *http.Request) {
	var req roleRequest
	if !api.DecodeJSON(w, r, maxBody, &req) {
		return
	}
	if req.Role != RoleAdmin && req.Role != RoleUser {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, `role: "admin" or "user"`)
		return
	}
	target := schema.UserID(chi.URLParam(r, "username"))
	if !target.Valid() {
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "member not found")
		return
	}
	actor, gid := identity(r), groupID(r)
	ctx, cancel := detached(r)
	defer cancel()
	g, changed, err := s.setRole(ctx, actor, target, gid, req.Role)
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	if changed {
		if !s.emit(ctx, w, gid, actor, event{action: actionRole, body: roleBody{Username: target, Role: req.Role}, receivers: g.usernames()}) {
			return
		}
	}
	api.WriteJSON(w, http.StatusOK, statusJSON{Status: true})
}

func (s *Service) handleDelete(w http.ResponseWriter, r *http.Request) {
	actor, gid := identity(r), groupID(r)
	ctx, cancel := detached(r)
	defer cancel()
	before, err := s.deleteGroup(ctx, actor, gid)
	if err != nil {
		s.writeErr(w, r, err)
		return
	}
	if !s.emit(ctx, w, gid, actor, event{action: actionDelete, body: deletedBody{Deleted: true}, receivers: before.usernames()}) {
		return
	}
	api.WriteJSON(w, http.StatusOK, statusJSON{Status: true})
}
