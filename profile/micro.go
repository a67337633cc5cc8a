package profile

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/micro"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// Micro service name, version and endpoint subjects.
const (
	serviceName           = "profile"
	serviceVersion        = "1.0.0"
	subjectAuth           = "profile.auth"
	subjectDevices        = "profile.devices"
	subjectTokenRemove    = "profile.token.remove"
	microCodeBadRequest   = "400"
	microCodeUnauthorized = "401"
	microCodeInternal     = "500"
)

// Wire types of the micro endpoints.
type (
	authRequest struct {
		User      string `json:"user"`
		AccessKey string `json:"accesskey"`
	}
	authResponse struct {
		User   schema.UserID   `json:"user"`
		Device schema.DeviceID `json:"device"`
	}
	devicesRequest struct {
		User schema.UserID `json:"user"`
	}
	removeTokenRequest struct {
		User   schema.UserID   `json:"user"`
		Device schema.DeviceID `json:"device"`
		Token  string          `json:"token"`
	}
)

// Started is closed once Run serves its endpoints.
func (s *Service) Started() <-chan struct{} { return s.up }

// Run serves the micro service "profile" on Config.NC until ctx ends, then
// stops it (draining its subscriptions).
func (s *Service) Run(ctx context.Context) error {
	if s.cfg.NC == nil {
		return errors.New("profile: run: Config.NC is nil")
	}
	svc, err := micro.AddService(s.cfg.NC, micro.Config{
		Name:        serviceName,
		Version:     serviceVersion,
		Description: "login, access keys, devices and push tokens",
	})
	if err != nil {
		return fmt.Errorf("profile: add micro service: %w", err)
	}
	endpoints := []struct {
		name, subject string
		handle        func(context.Context, micro.Request)
	}{
		{"auth", subjectAuth, s.serveAuth},
		{"devices", subjectDevices, s.serveDevices},
		{"token_remove", subjectTokenRemove, s.serveRemoveToken},
	}
	for _, e := range endpoints {
		if err := svc.AddEndpoint(e.name, micro.ContextHandler(ctx, e.handle), micro.WithEndpointSubject(e.subject)); err != nil {
			_ = svc.Stop()
			return fmt.Errorf("profile: add endpoint %s: %w", e.subject, err)
		}
	}
	s.log.Info("profile service started", "subject", "profile.>")
	close(s.up)
	<-ctx.Done()
	if err := svc.Stop(); err != nil {
		return fmt.Errorf("profile: stop micro service: %w", err)
	}
	return nil
}

func (s *Service) respondErr(req micro.Request, code, desc string) {
	if err := req.Error(code, desc, nil); err != nil {
		s.log.Warn("micro respond error", "subject", req.Subject(), "err", err)
	}
}

func (s *Service) respondJSON(req micro.Request, v any) {
	if err := req.RespondJSON(v); err != nil {
		s.log.Warn("micro respond error", "subject", req.Subject(), "err", err)
	}
}

func (s *Service) serveAuth(ctx context.Context, req micro.Request) {
	var in authRequest
	if err := json.Unmarshal(req.Data(), &in); err != nil {
		s.respondErr(req, microCodeBadRequest, "malformed request")
		return
	}
	id, err := s.Authenticate(ctx, in.User, in.AccessKey)
	switch {
	case errors.Is(err, api.ErrUnauthenticated):
		s.respondErr(req, microCodeUnauthorized, "unauthenticated")
	case err != nil:
		s.log.Error("micro auth error", "user", in.User, "err", err)
		s.respondErr(req, microCodeInternal, "internal error")
	default:
		s.respondJSON(req, authResponse{User: id.User, Device: id.Device})
	}
}

func (s *Service) serveDevices(ctx context.Context, req micro.Request) {
	var in devicesRequest
	if err := json.Unmarshal(req.Data(), &in); err != nil || !in.User.Valid() {
		s.respondErr(req, microCodeBadRequest, "malformed request")
		return
	}
	devs, err := s.Devices(ctx, in.User)
	if err != nil {
		s.log.Error("micro devices error", "user", in.User, "err", err)
		s.respondErr(req, microCodeInternal, "internal error")
		return
	}
	s.respondJSON(req, devs)
}

func (s *Service) serveRemoveToken(ctx context.Context, req micro.Request) {
	var in removeTokenRequest
	if err := json.Unmarshal(req.Data(), &in); err != nil || !in.User.Valid() || !in.Device.Valid() {
		s.respondErr(req, microCodeBadRequest, "malformed request")
		return
	}
	if err := s.RemoveToken(ctx, in.User, in.Device, in.Token); err != nil {
		s.log.Error("micro token remove error", "user", in.User, "device", in.Device, "err", err)
		s.respondErr(req, microCodeInternal, "internal error")
		return
	}
	s.respondJSON(req, statusResponse{Status: true})
}
