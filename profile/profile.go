package profile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// TokenVerifier checks a login token (a Firebase ID token, or anything in
// dev mode).
type TokenVerifier interface {
	// Verify returns the token's claims, or an error wrapping ErrBadToken
	// when the token is not valid. Any other error is a transient failure
	// of the verifier.
	Verify(ctx context.Context, token string) (Claims, error)
}

// Claims is what a verified login token says about its holder.
type Claims struct {
	UID   string // provider user id
	Phone string // E.164 ("+919999999999"); may be empty
}

// ErrBadToken means a login token is missing, malformed, expired or
// otherwise not valid.
var ErrBadToken = errors.New("invalid login token")

// DevVerifier accepts any non-empty token as Claims{UID: token}. It does
// not bind usernames. For development and tests only.
type DevVerifier struct{}

// Verify implements TokenVerifier.
func (DevVerifier) Verify(_ context.Context, token string) (Claims, error) {
	if token == "" {
		return Claims{}, ErrBadToken
	}
	return Claims{UID: token}, nil
}

// Device is one logged-in device of a user.
type Device struct {
	ID             schema.DeviceID `json:"deviceId"`
	PushToken      string          `json:"notificationToken,omitempty"`
	MessageVersion float64         `json:"messageVersion"`
	AddedOn        time.Time       `json:"addedOn"`
	LastLogin      time.Time       `json:"lastLogin"`
}

// Config configures a Service.
type Config struct {
	// Path is the bbolt file, e.g. <data-dir>/profile.db. Required.
	Path string
	// Verifier checks login tokens. Required.
	Verifier TokenVerifier
	// BindUsername requires the login username to equal the token's phone
	// number (E.164 with "+", or without it) or the token's uid; otherwise
	// login fails with 401 "username_mismatch". Set it with Firebase;
	// leave it false (the default) with DevVerifier.
	BindUsername bool
	// NC is used for the micro service (Run) and the kick publishes. May be
	// nil in unit tests: then no kicks are published and Run fails.
	NC *nats.Conn
	// Logger receives the service's logs. Default: discard.
	Logger *slog.Logger
	// MaxContacts is the most usernames one contact sync may send.
	// Default 5000.
	MaxContacts int
	// OpenTimeout is how long New waits for the bbolt file lock held by
	// another process. Default 2s.
	OpenTimeout time.Duration
}

// Service is the profile service. Create it with New; Close it when done.
type Service struct {
	cfg   Config
	log   *slog.Logger
	store *store
	now   func() time.Time
	up    chan struct{} // closed once Run serves its endpoints
}

// New opens (or creates) the bbolt file and returns the service.
func New(cfg Config) (*Service, error) {
	if cfg.Path == "" {
		return nil, errors.New("profile: config: Path is required")
	}
	if cfg.Verifier == nil {
		return nil, errors.New("profile: config: Verifier is required")
	}
	if cfg.MaxContacts < 0 {
		return nil, fmt.Errorf("profile: config: MaxContacts %d is negative", cfg.MaxContacts)
	}
	if cfg.MaxContacts == 0 {
		cfg.MaxContacts = 5000
	}
	if cfg.OpenTimeout <= 0 {
		cfg.OpenTimeout = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	st, err := openStore(cfg.Path, cfg.OpenTimeout)
	if err != nil {
		return nil, fmt.Errorf("profile: %w", err)
	}
	return &Service{
		up:    make(chan struct{}),
		cfg:   cfg,
		log:   cfg.Logger,
		store: st,
		now:   func() time.Time { return time.Now().UTC() },
	}, nil
}

// Close closes the bbolt file. Run must have returned first.
func (s *Service) Close() error {
	if err := s.store.close(); err != nil {
		return fmt.Errorf("profile: close: %w", err)
	}
	return nil
}

// Authenticate implements api.Authenticator: it returns the device whose
// access key is accessKey. Unknown users and wrong keys give an error
// wrapping api.ErrUnauthenticated.
func (s *Service) Authenticate(_ context.Context, user, accessKey string) (api.Identity, error) {
	u := schema.UserID(user)
	if !u.Valid() || accessKey == "" || len(accessKey) > maxAccessKeyLen {
		return api.Identity{}, fmt.Errorf("profile: %w", api.ErrUnauthenticated)
	}
	dev, ok, err := s.store.authenticate(u, hashKey(accessKey))
	if err != nil {
		return api.Identity{}, fmt.Errorf("profile: %w", err)
	}
	if !ok {
		return api.Identity{}, fmt.Errorf("profile: %w", api.ErrUnauthenticated)
	}
	return api.Identity{User: u, Device: dev}, nil
}

// Devices returns the devices of user, with their push tokens, ordered by
// device id. An unknown user has none.
func (s *Service) Devices(_ context.Context, user schema.UserID) ([]Device, error) {
	if !user.Valid() {
		return nil, fmt.Errorf("profile: devices of %q: %w", user, schema.ErrInvalidID)
	}
	devs, err := s.store.devices(user)
	if err != nil {
		return nil, fmt.Errorf("profile: %w", err)
	}
	return devs, nil
}

// RemoveToken removes the push token of (user, device) if it still equals
// token, so a newer token from a re-login is kept. A missing device or a
// different token is not an error.
func (s *Service) RemoveToken(_ context.Context, user schema.UserID, device schema.DeviceID, token string) error {
	if !user.Valid() || !device.Valid() {
		return fmt.Errorf("profile: remove token of %q/%q: %w", user, device, schema.ErrInvalidID)
	}
	if token == "" {
		return nil
	}
	err := s.store.setToken(user, device, "", &token)
	if err != nil && !errors.Is(err, errNoDevice) {
		return fmt.Errorf("profile: %w", err)
	}
	return nil
}
