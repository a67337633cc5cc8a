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
)

// Started is closed once Run serves groups.members.
func (s *Service) Started() <-chan struct{} { return s.up }

// Run serves the micro service "groups" (endpoint groups.members) on
// Config.NC until ctx ends, then stops it.
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
	s.log.Info("groups service started", "subject", subjectMembers)
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

func (s *Service) respondErr(req micro.Request, code, desc string) {
	if err := req.Error(code, desc, nil); err != nil {
		s.log.Warn("micro respond error", "subject", req.Subject(), "err", err)
	}
}

// Client reaches the groups micro service over NATS (split mode). Its
// Members method has the router's MemberLister signature. It is safe for
// concurrent use.
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
