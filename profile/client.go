package profile

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/schema"
)

// Client reaches the profile micro service over NATS (split mode). It
// implements api.Authenticator, Devices and RemoveToken. It is safe for
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

// errRemote is a micro error reply other than 401.
type errRemote struct{ code, desc string }

func (e *errRemote) Error() string { return "profile service error " + e.code + ": " + e.desc }

// call sends req to subject and decodes the JSON reply into resp.
func (c *Client) call(ctx context.Context, subject string, req, resp any) error {
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("profile client: encode %s request: %w", subject, err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	msg, err := c.nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		return fmt.Errorf("profile client: request %s: %w", subject, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		if code == microCodeUnauthorized {
			return fmt.Errorf("profile client: %w", api.ErrUnauthenticated)
		}
		return fmt.Errorf("profile client: %s: %w", subject, &errRemote{code: code, desc: msg.Header.Get(micro.ErrorHeader)})
	}
	if err := json.Unmarshal(msg.Data, resp); err != nil {
		return fmt.Errorf("profile client: decode %s reply: %w", subject, err)
	}
	return nil
}

// Authenticate implements api.Authenticator.
func (c *Client) Authenticate(ctx context.Context, user, accessKey string) (api.Identity, error) {
	if !schema.UserID(user).Valid() || accessKey == "" {
		return api.Identity{}, fmt.Errorf("profile client: %w", api.ErrUnauthenticated)
	}
	var resp authResponse
	if err := c.call(ctx, subjectAuth, authRequest{User: user, AccessKey: accessKey}, &resp); err != nil {
		return api.Identity{}, err
	}
	if resp.User != schema.UserID(user) || !resp.Device.Valid() {
		return api.Identity{}, errors.New("profile client: auth reply names another user or an invalid device")
	}
	return api.Identity{User: resp.User, Device: resp.Device}, nil
}

// Devices returns the devices of user with their push tokens.
func (c *Client) Devices(ctx context.Context, user schema.UserID) ([]Device, error) {
	if !user.Valid() {
		return nil, fmt.Errorf("profile client: devices of %q: %w", user, schema.ErrInvalidID)
	}
	var devs []Device
	if err := c.call(ctx, subjectDevices, devicesRequest{User: user}, &devs); err != nil {
		return nil, err
	}
	return devs, nil
}

// RemoveToken removes the push token of (user, device) if it still equals
// token.
func (c *Client) RemoveToken(ctx context.Context, user schema.UserID, device schema.DeviceID, token string) error {
	if !user.Valid() || !device.Valid() {
		return fmt.Errorf("profile client: remove token of %q/%q: %w", user, device, schema.ErrInvalidID)
	}
	var resp statusResponse
	return c.call(ctx, subjectTokenRemove, removeTokenRequest{User: user, Device: device, Token: token}, &resp)
}
