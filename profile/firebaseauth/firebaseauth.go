// Package firebaseauth verifies Firebase ID tokens for profile login with
// the Firebase Admin SDK. It lives apart from package profile so that only
// binaries that use Firebase link the SDK.
//
// It publishes and consumes no subjects. Verifier is safe for concurrent
// use. Token verification fetches Google's public certificates on first use
// (and when they expire); constructing a Verifier contacts nothing: no
// Google endpoint, no metadata server.
//
// Offline testing: with FIREBASE_AUTH_EMULATOR_HOST set, the SDK skips
// signature checks and asks the emulator (or a fake speaking its
// accounts:lookup API) whether the user exists and is disabled. That
// variable turns off signature checks, so the composition root must refuse
// it outside development and tests.
package firebaseauth

import (
	"context"
	"errors"
	"fmt"

	firebase "firebase.google.com/go/v4"
	"firebase.google.com/go/v4/auth"
	"golang.org/x/oauth2"
	"google.golang.org/api/option"

	"github.com/vartalap/vartalap/profile"
)

// Verifier implements profile.TokenVerifier for Firebase ID tokens.
type Verifier struct {
	client *auth.Client
}

var _ profile.TokenVerifier = (*Verifier)(nil)

// errNoCredentials is what the SDK's authenticated HTTP client gets when no
// credentials file is configured. ID-token verification never uses that
// client (it only fetches Google's public certificates), so this only
// shows up if some other Admin API were called.
var errNoCredentials = errors.New("firebaseauth: no credentials configured")

type noCredentials struct{}

func (noCredentials) Token() (*oauth2.Token, error) { return nil, errNoCredentials }

// New returns a verifier for projectID. credentialsFile (a service-account
// JSON) may be empty: verifying ID tokens needs no credentials.
//
// Without a credentials file New passes an explicit token source that never
// succeeds, rather than option.WithoutAuthentication: the SDK's auth client
// looks up application default credentials at construction unless a
// credential option is given, and that lookup probes the GCE metadata
// server when nothing else is configured.
func New(ctx context.Context, projectID, credentialsFile string) (*Verifier, error) {
	if projectID == "" {
		return nil, errors.New("firebaseauth: project id is required")
	}
	opts := []option.ClientOption{option.WithTokenSource(noCredentials{})}
	if credentialsFile != "" {
		opts = []option.ClientOption{option.WithAuthCredentialsFile(option.ServiceAccount, credentialsFile)}
	}
	app, err := firebase.NewApp(ctx, &firebase.Config{ProjectID: projectID}, opts...)
	if err != nil {
		return nil, fmt.Errorf("firebaseauth: new app: %w", err)
	}
	client, err := app.Auth(ctx)
	if err != nil {
		return nil, fmt.Errorf("firebaseauth: auth client: %w", err)
	}
	return &Verifier{client: client}, nil
}

// Verify checks a Firebase ID token and returns its uid and phone_number
// claim. A malformed, expired, revoked or wrongly addressed token, or one of
// a disabled or unknown user, gives an error wrapping profile.ErrBadToken;
// anything else (e.g. the certificates could not be fetched) is transient.
func (v *Verifier) Verify(ctx context.Context, token string) (profile.Claims, error) {
	tok, err := v.client.VerifyIDToken(ctx, token)
	if err != nil {
		if auth.IsIDTokenInvalid(err) || auth.IsUserNotFound(err) || auth.IsTenantIDMismatch(err) {
			return profile.Claims{}, fmt.Errorf("%w: %v", profile.ErrBadToken, err)
		}
		return profile.Claims{}, fmt.Errorf("firebaseauth: verify id token: %w", err)
	}
	phone, _ := tok.Claims["phone_number"].(string)
	return profile.Claims{UID: tok.UID, Phone: phone}, nil
}
