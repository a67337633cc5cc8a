package groups

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/vartalap/vartalap/schema"
)

// Micro service name, version, endpoint subject and error codes.
const (
	serviceName         = "groups"
	serviceVersion      = "1.0.0"
	subjectMembers      = "groups.members"
	subjectMemberships  = "groups.memberships"
	microCodeBadRequest = "400"
	microCodeNotFound   = "404"
	microCodeInternal   = "500"
)

// Wire types of the micro endpoint.
type (
	membersRequest struct {
		Group schema.GroupID `json:"group"`
	}
	membersResponse struct {
		Members []schema.UserID `json:"members"`
	}
	membershipsRequest struct {
		User schema.UserID `json:"user"`
	}
	membershipsResponse struct {
		Memberships []schema.Membership `json:"memberships"`
	}
)

// Started is closed once Run serves groups.members and groups.memberships.
func (s *Service) Started() <-chan struct{} { return s.up }

// Run serves the micro service "groups" (endpoints groups.members and
// groups.memberships) on Config.NC until ctx ends, then stops it.
func (s *Service) Run(ctx context.Context) error {
	svc, err := micro.AddService(s.nc, micro.Config{
		Name:        serviceName,
		Version:     serviceVersion,
		Description: "group membership",
	})
	if err != nil {
		return fmt.Errorf("groups: add micro service: %w", err)
	}
	if err := svc.AddEndpoint("members", micro.ContextHandler(ctx, s.serveMembers), micro.WithEndpointSubject(subjectMembers)); err != nil {
		_ = svc.Stop()
		return fmt.Errorf("groups: add endpoint %s: %w", subjectMembers, err)
	}
	if err := svc.AddEndpoint("memberships", micro.ContextHandler(ctx, s.serveMemberships), micro.WithEndpointSubject(subjectMemberships)); err != nil {
		_ = svc.Stop()
		return fmt.Errorf("groups: add endpoint %s: %w", subjectMemberships, err)
	}
	s.log.Info("groups service started", "subjects", []string{subjectMembers, subjectMemberships})
	close(s.up)
	<-ctx.Done()
	if err := svc.Stop(); err != nil {
		return fmt.Errorf("groups: stop micro service: %w", err)
	}
	return nil
}

func (s *Service) serveMembers(ctx context.Context, req micro.Request) {
	var in membersRequest
	if err := json.Unmarshal(req.Data(), &in); err != nil || in.Group == "" {
		s.respondErr(req, microCodeBadRequest, "malformed request")
		return
	}
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	members, err := s.Members(ctx, in.Group)
	switch {
	case errors.Is(err, ErrNotFound):
		s.respondErr(req, microCodeNotFound, "group not found")
	case err != nil:
		s.log.Error("micro members error", "group", in.Group, "err", err)
		s.respondErr(req, microCodeInternal, "internal error")
	default:
		if err := req.RespondJSON(membersResponse{Members: members}); err != nil {
			s.log.Warn("micro respond error", "subject", req.Subject(), "err", err)
		}
	}
}

func (s *Service) serveMemberships(ctx context.Context, req micro.Request) {
	var in membershipsRequest
	if err := json.Unmarshal(req.Data(), &in); err != nil || !in.User.Valid() {
		s.respondErr(req, microCodeBadRequest, "malformed request or invalid user")
		return
	}
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	ms, err := s.Memberships(ctx, in.User)
	if err != nil {
		s.log.Error("micro memberships error", "user", in.User, "err", err)
		s.respondErr(req, microCodeInternal, "internal error")
		return
	}
	if err := req.RespondJSON(membershipsResponse{Memberships: ms}); err != nil {
		s.log.Warn("micro respond error", "subject", req.Subject(), "err", err)
	}
}

func (s *Service) respondErr(req micro.Request, code, desc string) {
	if err := req.Error(code, desc, nil); err != nil {
		s.log.Warn("micro respond error", "subject", req.Subject(), "err", err)
	}
}

// Client reaches the groups micro service over NATS (split mode). Its
// Members method has the router's MemberLister signature; Memberships has
// Service.Memberships's. It is safe for concurrent use.
type Client struct {
	nc      *nats.Conn
	timeout time.Duration
}

// NewClient returns a client that waits at most timeout for each reply
// (default 5s when timeout <= 0; a shorter ctx deadline wins).
func NewClient(nc *nats.Conn, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	return &Client{nc: nc, timeout: timeout}
}

// Members returns the members of group g in join order, or ErrNotFound
// (wrapped) when it does not exist.
func (c *Client) Members(ctx context.Context, g schema.GroupID) ([]schema.UserID, error) {
	if !g.Valid() {
		return nil, fmt.Errorf("groups client: members of %q: %w", g, ErrNotFound)
	}
	data, err := json.Marshal(membersRequest{Group: g})
	if err != nil {
		return nil, fmt.Errorf("groups client: encode request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	msg, err := c.nc.RequestWithContext(ctx, subjectMembers, data)
	if err != nil {
		return nil, fmt.Errorf("groups client: request %s: %w", subjectMembers, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		if code == microCodeNotFound {
			return nil, fmt.Errorf("groups client: members of %s: %w", g, ErrNotFound)
		}
		return nil, fmt.Errorf("groups client: %s: service error %s: %s", subjectMembers, code, msg.Header.Get(micro.ErrorHeader))
	}
	var resp membersResponse
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("groups client: decode reply: %w", err)
	}
	return resp.Members, nil
}

// Memberships returns u's memberships like Service.Memberships. An invalid
// u is an error wrapping schema.ErrInvalidID.
func (c *Client) Memberships(ctx context.Context, u schema.UserID) ([]schema.Membership, error) {
	if !u.Valid() {
		return nil, fmt.Errorf("groups client: memberships of %q: %w", u, schema.ErrInvalidID)
	}
	data, err := json.Marshal(membershipsRequest{User: u})
	if err != nil {
		return nil, fmt.Errorf("groups client: encode request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	msg, err := c.nc.RequestWithContext(ctx, subjectMemberships, data)
	if err != nil {
		return nil, fmt.Errorf("groups client: request %s: %w", subjectMemberships, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		if code == microCodeBadRequest {
			return nil, fmt.Errorf("groups client: memberships of %s: %s: %w", u, msg.Header.Get(micro.ErrorHeader), schema.ErrInvalidID)
		}
		return nil, fmt.Errorf("groups client: %s: service error %s: %s", subjectMemberships, code, msg.Header.Get(micro.ErrorHeader))
	}
	var resp membershipsResponse
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("groups client: decode reply: %w", err)
	}
	if resp.Memberships == nil {
		resp.Memberships = []schema.Membership{}
	}
	return resp.Memberships, nil
}
