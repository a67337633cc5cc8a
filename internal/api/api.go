// Package api holds what every HTTP-facing service shares at the edge: the
// authenticated identity, the middleware that establishes it from the seed's
// `user` + `accesskey` headers or cookies, and the JSON error body.
//
// Error bodies are always JSON: {"status":false,"error":"<code>","message":"<text>"}.
// The code is a stable snake_case string clients may branch on; the message
// is for humans. Internal failures never leak err.Error() to clients.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/url"

	"github.com/vartalap/vartalap/schema"
)

// Identity is an authenticated (user, device) pair.
type Identity struct {
	User   schema.UserID
	Device schema.DeviceID
}

// Authenticator checks an access key.
type Authenticator interface {
	// Authenticate returns the identity the key belongs to, or an error
	// wrapping ErrUnauthenticated when the pair is not valid.
	Authenticate(ctx context.Context, user, accessKey string) (Identity, error)
}

// ErrUnauthenticated means the credentials are missing or wrong.
var ErrUnauthenticated = errors.New("unauthenticated")

// Error codes shared by every service.
const (
	CodeBadRequest      = "bad_request"
	CodeUnauthenticated = "unauthenticated"
	CodeForbidden       = "forbidden"
	CodeNotFound        = "not_found"
	CodeConflict        = "conflict"
	CodeTooLarge        = "too_large"
	CodeUnavailable     = "unavailable"
	CodeInternal        = "internal"
	CodeRateLimited     = "rate_limited"
)

// ErrorBody is the JSON body of every error response.
type ErrorBody struct {
	Status  bool   `json:"status"`
	Error   string `json:"error"`
	Message string `json:"message,omitempty"`
}

// WriteJSON writes v as a JSON response with the given status.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// WriteError writes the JSON error body.
func WriteError(w http.ResponseWriter, status int, code, message string) {
	WriteJSON(w, status, ErrorBody{Status: false, Error: code, Message: message})
}

// Credentials returns the user and access key of a request: the headers
// `user` and `accesskey`, or else the cookies of the same names (the seed's
// browser client), URL-decoded.
func Credentials(r *http.Request) (user, key string) {
	user = r.Header.Get("user")
	key = r.Header.Get("accesskey")
	if user == "" {
		if c, err := r.Cookie("user"); err == nil {
			user, _ = url.QueryUnescape(c.Value)
		}
	}
	if key == "" {
		if c, err := r.Cookie("accesskey"); err == nil {
			key, _ = url.QueryUnescape(c.Value)
		}
	}
	return user, key
}

type ctxKey struct{}

// WithIdentity returns a context carrying id.
func WithIdentity(ctx context.Context, id Identity) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// IdentityFrom returns the identity RequireAuth stored in ctx.
func IdentityFrom(ctx context.Context) (Identity, bool) {
	id, ok := ctx.Value(ctxKey{}).(Identity)
	return id, ok
}

// RequireAuth authenticates every request with a. A request without valid
// credentials gets 401 and a JSON body; an authenticator failure other than
// ErrUnauthenticated gets 503. log may be nil.
func RequireAuth(a Authenticator, log *slog.Logger) func(http.Handler) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			user, key := Credentials(r)
			if user == "" || key == "" {
				log.Info("auth failed", "reason", "missing credentials", "path", r.URL.Path, "remote", r.RemoteAddr)
				WriteError(w, http.StatusUnauthorized, CodeUnauthenticated, "missing user or accesskey")
				return
			}
			id, err := a.Authenticate(r.Context(), user, key)
			if errors.Is(err, ErrUnauthenticated) {
				log.Info("auth failed", "reason", "bad credentials", "user", user, "path", r.URL.Path, "remote", r.RemoteAddr)
				WriteError(w, http.StatusUnauthorized, CodeUnauthenticated, "invalid user or accesskey")
				return
			}
			if err != nil {
				log.Error("auth error", "user", user, "err", err)
				WriteError(w, http.StatusServiceUnavailable, CodeUnavailable, "authentication unavailable")
				return
			}
			next.ServeHTTP(w, r.WithContext(WithIdentity(r.Context(), id)))
		})
	}
}

// DecodeJSON decodes a JSON request body of at most maxBytes into v. On
// failure it writes a 400 (or 413) and returns false.
func DecodeJSON(w http.ResponseWriter, r *http.Request, maxBytes int64, v any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, maxBytes)
	dec := json.NewDecoder(r.Body)
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			WriteError(w, http.StatusRequestEntityTooLarge, CodeTooLarge, "request body too large")
			return false
		}
		WriteError(w, http.StatusBadRequest, CodeBadRequest, "malformed JSON body")
		return false
	}
	return true
}

// StripVersion makes every route answer with and without the seed's "/v1.0"
// prefix: "/v1.0/login" is served as "/login" (seed nginx rewrite, §5.1).
func StripVersion(next http.Handler) http.Handler {
	const prefix = "/v1.0"
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		if p == prefix || (len(p) > len(prefix) && p[:len(prefix)+1] == prefix+"/") {
			r2 := r.Clone(r.Context())
			r2.URL.Path = p[len(prefix):]
			if r2.URL.Path == "" {
				r2.URL.Path = "/"
			}
			r2.URL.RawPath = ""
			r2.RequestURI = r2.URL.RequestURI()
			next.ServeHTTP(w, r2)
			return
		}
		next.ServeHTTP(w, r)
	})
}
