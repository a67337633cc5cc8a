// Package fcm is the Firebase Cloud Messaging provider of package push: a
// push.Sender on the Firebase Admin SDK (firebase.google.com/go/v4/messaging,
// FCM HTTP v1 API). It lives in its own package so that only the binaries
// that send pushes link the SDK.
//
// Each Notification becomes one data-only message: data as given, Android
// priority "high", android.ttl in seconds ("86400s" for 24h) and
// android.collapse_key. Errors are classified for push: an unregistered
// token, a sender-id mismatch and an INVALID_ARGUMENT about the token wrap
// push.ErrTokenInvalid; 429, 5xx, UNAVAILABLE/INTERNAL and transport
// failures are *push.RetryableError carrying the server's Retry-After;
// everything else is permanent. The SDK itself retries 503 and network
// errors up to four times (with backoff, honouring Retry-After up to two
// minutes) inside one Send; push's own retries come on top of those.
//
// Sender is safe for concurrent use.
package fcm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	firebase "firebase.google.com/go/v4"
	"firebase.google.com/go/v4/errorutils"
	"firebase.google.com/go/v4/messaging"
	"google.golang.org/api/option"

	"github.com/vartalap/vartalap/push"
)

// Sender sends push notifications through FCM.
type Sender struct {
	client *messaging.Client
}

var _ push.Sender = (*Sender)(nil)

// New builds a Sender on the Firebase Admin SDK messaging client.
//
// With endpoint set, requests go to that FCM API root (e.g.
// "http://127.0.0.1:9000"; "/v1" is appended unless present) without
// authentication: for tests and emulators. projectID is then required, and
// neither Google credentials nor a metadata server are ever consulted.
//
// Otherwise the service-account JSON credentialsFile is used (or
// $GOOGLE_APPLICATION_CREDENTIALS when empty; one of them is required, so the
// SDK never falls back to probing a metadata server), with projectID or else
// the project of the credentials.
func New(ctx context.Context, projectID, credentialsFile, endpoint string) (*Sender, error) {
	var opts []option.ClientOption
	if endpoint != "" {
		if projectID == "" {
			return nil, errors.New("fcm: a project id is required with an endpoint")
		}
		base := strings.TrimSuffix(endpoint, "/")
		if !strings.HasSuffix(base, "/v1") {
			base += "/v1"
		}
		opts = append(opts, option.WithEndpoint(base), option.WithoutAuthentication())
	} else {
		if credentialsFile == "" {
			credentialsFile = os.Getenv("GOOGLE_APPLICATION_CREDENTIALS")
		}
		if credentialsFile == "" {
			return nil, errors.New("fcm: no credentials: set a service-account file or GOOGLE_APPLICATION_CREDENTIALS")
		}
		opts = append(opts, option.WithAuthCredentialsFile(option.ServiceAccount, credentialsFile))
	}
	app, err := firebase.NewApp(ctx, &firebase.Config{ProjectID: projectID}, opts...)
	if err != nil {
		return nil, fmt.Errorf("fcm: firebase app: %w", err)
	}
	client, err := app.Messaging(ctx)
	if err != nil {
		return nil, fmt.Errorf("fcm: messaging client: %w", err)
	}
	return &Sender{client: client}, nil
}

// Send sends n as one FCM data message. Errors wrap push.ErrTokenInvalid or
// are *push.RetryableError as described in the package comment.
func (s *Sender) Send(ctx context.Context, n push.Notification) error {
	android := &messaging.AndroidConfig{Priority: "high", CollapseKey: n.CollapseKey}
	if n.TTL > 0 {
		ttl := n.TTL.Truncate(time.Second)
		android.TTL = &ttl
	}
	// The seed's apps register FCM registration tokens, which the v1 API
	// takes in message.token; Fid is a different id (a Firebase
	// installation id), so the deprecated field is the right one here.
	//lint:ignore SA1019 registration tokens are not installation ids
	msg := &messaging.Message{Token: n.Token, Data: n.Data, Android: android}
	_, err := s.client.Send(ctx, msg)
	if err == nil {
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("fcm send: %w", ctxErr)
	}
	return classify(err)
}

// classify maps an SDK error to push's error classes.
func classify(err error) error {
	resp := errorutils.HTTPResponse(err)
	switch {
	case messaging.IsUnregistered(err), messaging.IsSenderIDMismatch(err),
		messaging.IsInvalidArgument(err) && aboutToken(resp):
		return fmt.Errorf("fcm send: %w: %w", push.ErrTokenInvalid, err)
	case resp != nil && (resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500),
		messaging.IsQuotaExceeded(err), messaging.IsUnavailable(err), messaging.IsInternal(err),
		errorutils.IsUnavailable(err), errorutils.IsInternal(err), errorutils.IsDeadlineExceeded(err),
		resp == nil && errorutils.IsUnknown(err): // transport failure
		return &push.RetryableError{After: retryAfter(resp), Err: fmt.Errorf("fcm send: %w", err)}
	}
	return fmt.Errorf("fcm send: %w", err)
}

// aboutToken reports whether an INVALID_ARGUMENT response names the token
// (google.rpc.BadRequest field violation "message.token").
func aboutToken(resp *http.Response) bool {
	if resp == nil || resp.Body == nil {
		return false
	}
	var body struct {
		Error struct {
			Details []struct {
				FieldViolations []struct {
					Field string `json:"field"`
				} `json:"fieldViolations"`
			} `json:"details"`
		} `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return false
	}
	for _, d := range body.Error.Details {
		for _, v := range d.FieldViolations {
			if v.Field == "message.token" {
				return true
			}
		}
	}
	return false
}

// retryAfter parses the Retry-After header (seconds or an HTTP date).
func retryAfter(resp *http.Response) time.Duration {
	if resp == nil {
		return 0
	}
	h := resp.Header.Get("Retry-After")
	if h == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(h, 10, 64); err == nil && secs > 0 {
		return time.Duration(secs) * time.Second
	}
	if at, err := http.ParseTime(h); err == nil {
		return max(time.Until(at), 0)
	}
	return 0
}
