package firebaseauth_test

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/profile"
	"github.com/vartalap/vartalap/profile/firebaseauth"
)

const projectID = "demo-vartalap"

// isolate points every Google credential and metadata lookup at local
// places, so nothing a test does can leave loopback. It returns the number
// of requests the fake metadata server received.
func isolate(t *testing.T) *atomic.Int64 {
	t.Helper()
	var hits atomic.Int64
	meta := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		http.NotFound(w, r)
	}))
	t.Cleanup(meta.Close)
	home := t.TempDir()
	t.Setenv("GCE_METADATA_HOST", strings.TrimPrefix(meta.URL, "http://"))
	t.Setenv("GOOGLE_APPLICATION_CREDENTIALS", "")
	t.Setenv("HOME", home)
	t.Setenv("CLOUDSDK_CONFIG", home)
	t.Setenv("FIREBASE_CONFIG", "")
	t.Setenv("FIREBASE_AUTH_EMULATOR_HOST", "")
	return &hits
}

// fakeEmulator answers the Auth emulator's accounts:lookup for known users.
type fakeEmulator struct {
	mu       sync.Mutex
	disabled map[string]bool // uid → disabled; absent = no such user
	lookups  int
}

func (f *fakeEmulator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/identitytoolkit.googleapis.com/v1/projects/"+projectID+"/accounts:lookup" {
		http.NotFound(w, r)
		return
	}
	var req struct {
		LocalID []string `json:"localId"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || len(req.LocalID) != 1 {
		http.Error(w, `{"error":{"code":400,"message":"INVALID_REQUEST"}}`, http.StatusBadRequest)
		return
	}
	uid := req.LocalID[0]
	f.mu.Lock()
	f.lookups++
	disabled, ok := f.disabled[uid]
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	switch {
	case uid == "forbidden":
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, `{"error":{"code":403,"message":"PERMISSION_DENIED"}}`)
	case !ok:
		io.WriteString(w, `{"kind":"identitytoolkit#GetAccountInfoResponse"}`)
	default:
		json.NewEncoder(w).Encode(map[string]any{
			"kind":  "identitytoolkit#GetAccountInfoResponse",
			"users": []map[string]any{{"localId": uid, "disabled": disabled}},
		})
	}
}

// startEmulator runs the fake and puts the SDK in emulator mode.
func startEmulator(t *testing.T, users map[string]bool) *fakeEmulator {
	t.Helper()
	f := &fakeEmulator{disabled: users}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	t.Setenv("FIREBASE_AUTH_EMULATOR_HOST", strings.TrimPrefix(srv.URL, "http://"))
	return f
}

// idToken builds an unsigned ID token (accepted only in emulator mode).
func idToken(t *testing.T, claims map[string]any) string {
	t.Helper()
	enc := func(v any) string {
		raw, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(raw)
	}
	return enc(map[string]any{"alg": "none", "typ": "JWT"}) + "." + enc(claims) + "."
}

// claims returns valid ID-token claims for uid, with overrides applied
// (a nil value deletes the claim).
func claims(uid string, overrides map[string]any) map[string]any {
	now := time.Now()
	c := map[string]any{
		"iss":       "https://securetoken.google.com/" + projectID,
		"aud":       projectID,
		"sub":       uid,
		"user_id":   uid,
		"iat":       now.Add(-time.Minute).Unix(),
		"auth_time": now.Add(-time.Minute).Unix(),
		"exp":       now.Add(time.Hour).Unix(),
		"firebase":  map[string]any{"sign_in_provider": "phone", "identities": map[string]any{}},
	}
	for k, v := range overrides {
		if v == nil {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	return c
}

func TestVerifyEmulatorMode(t *testing.T) {
	hits := isolate(t)
	fake := startEmulator(t, map[string]bool{"alice": false, "bob": false, "mallory": true})
	v, err := firebaseauth.New(t.Context(), projectID, "")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tests := []struct {
		name    string
		token   string
		want    profile.Claims
		wantErr error // nil: success; profile.ErrBadToken; errTransient: any other error
	}{
		{"valid with phone", idToken(t, claims("alice", map[string]any{"phone_number": "+919999999999"})), profile.Claims{UID: "alice", Phone: "+919999999999"}, nil},
		{"valid without phone", idToken(t, claims("bob", nil)), profile.Claims{UID: "bob"}, nil},
		{"wrong audience", idToken(t, claims("alice", map[string]any{"aud": "other-project"})), profile.Claims{}, profile.ErrBadToken},
		{"wrong issuer", idToken(t, claims("alice", map[string]any{"iss": "https://evil.example/" + projectID})), profile.Claims{}, profile.ErrBadToken},
		{"expired", idToken(t, claims("alice", map[string]any{"exp": now.Add(-time.Hour).Unix(), "iat": now.Add(-2 * time.Hour).Unix()})), profile.Claims{}, profile.ErrBadToken},
		{"issued in the future", idToken(t, claims("alice", map[string]any{"iat": now.Add(time.Hour).Unix()})), profile.Claims{}, profile.ErrBadToken},
		{"no subject", idToken(t, claims("alice", map[string]any{"sub": nil})), profile.Claims{}, profile.ErrBadToken},
		{"disabled user", idToken(t, claims("mallory", nil)), profile.Claims{}, profile.ErrBadToken},
		{"unknown user", idToken(t, claims("nobody", nil)), profile.Claims{}, profile.ErrBadToken},
		{"malformed", "not-a-jwt", profile.Claims{}, profile.ErrBadToken},
		{"empty", "", profile.Claims{}, profile.ErrBadToken},
		{"lookup refused", idToken(t, claims("forbidden", nil)), profile.Claims{}, errTransient},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := v.Verify(t.Context(), tt.token)
			switch {
			case tt.wantErr == nil:
				if err != nil || got != tt.want {
					t.Fatalf("Verify = %+v, %v; want %+v", got, err, tt.want)
				}
			case tt.wantErr == errTransient:
				if err == nil || errors.Is(err, profile.ErrBadToken) {
					t.Fatalf("Verify err = %v, want a failure that is not ErrBadToken", err)
				}
			default:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Verify = %+v, %v; want %v", got, err, tt.wantErr)
				}
			}
		})
	}
	fake.mu.Lock()
	lookups := fake.lookups
	fake.mu.Unlock()
	if lookups == 0 {
		t.Error("the fake emulator was never asked: the test is not exercising emulator mode")
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("metadata server got %d requests", n)
	}
}

var errTransient = errors.New("transient")

// serviceAccountFile writes a throwaway service-account JSON whose token
// endpoint is local.
func serviceAccountFile(t *testing.T) string {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	sa := map[string]string{
		"type":           "service_account",
		"project_id":     projectID,
		"private_key_id": "test-key",
		"private_key":    string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		"client_email":   "test@" + projectID + ".iam.gserviceaccount.com",
		"client_id":      "1",
		"token_uri":      "http://127.0.0.1:1/token",
	}
	raw, err := json.Marshal(sa)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "sa.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestNewContactsNothing builds verifiers in production mode (no emulator)
// and checks that neither construction nor rejecting an unsigned token
// made a metadata request. An application-default-credentials lookup would
// ask the (fake) metadata server for the project id.
func TestNewContactsNothing(t *testing.T) {
	hits := isolate(t)
	tests := []struct {
		name  string
		creds string
	}{
		{"no credentials", ""},
		{"service account file", serviceAccountFile(t)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := firebaseauth.New(t.Context(), projectID, tt.creds)
			if err != nil {
				t.Fatal(err)
			}
			// Unsigned tokens are rejected before any certificate fetch.
			_, err = v.Verify(t.Context(), idToken(t, claims("alice", nil)))
			if !errors.Is(err, profile.ErrBadToken) {
				t.Fatalf("unsigned token in production mode: err = %v, want ErrBadToken", err)
			}
			if n := hits.Load(); n != 0 {
				t.Fatalf("metadata server got %d requests", n)
			}
		})
	}
	if _, err := firebaseauth.New(t.Context(), "", ""); err == nil {
		t.Error("New without a project id succeeded")
	}
	if _, err := firebaseauth.New(t.Context(), projectID, filepath.Join(t.TempDir(), "missing.json")); err == nil {
		t.Error("New with a missing credentials file succeeded")
	}
}

// TestLoginBindsFirebaseUsername runs profile login with the Firebase
// verifier and BindUsername, over real HTTP.
func TestLoginBindsFirebaseUsername(t *testing.T) {
	isolate(t)
	startEmulator(t, map[string]bool{"uid-alice": false, "uid-mallory": true})
	v, err := firebaseauth.New(t.Context(), projectID, "")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := profile.New(profile.Config{Path: filepath.Join(t.TempDir(), "profile.db"), Verifier: v, BindUsername: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	r := chi.NewRouter()
	svc.Routes(r)
	srv := httptest.NewServer(api.StripVersion(r))
	t.Cleanup(srv.Close)

	alice := idToken(t, claims("uid-alice", map[string]any{"phone_number": "+919999999999"}))
	mallory := idToken(t, claims("uid-mallory", map[string]any{"phone_number": "+918888888888"}))
	tests := []struct {
		name, user, token string
		status            int
		code              string
	}{
		{"own number", "+919999999999", alice, 200, ""},
		{"own number without plus", "919999999999", alice, 200, ""},
		{"own uid", "uid-alice", alice, 200, ""},
		{"someone else's number", "+918888888888", alice, 401, "username_mismatch"},
		{"disabled user", "+918888888888", mallory, 401, api.CodeUnauthenticated},
		{"forged token", "+919999999999", "x.y.z", 401, api.CodeUnauthenticated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body, _ := json.Marshal(map[string]string{"username": tt.user})
			req, err := http.NewRequest("POST", srv.URL+"/v1.0/login", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("token", tt.token)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var got map[string]any
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d body %v, want %d", resp.StatusCode, got, tt.status)
			}
			if tt.status == 200 {
				key, _ := got["accesskey"].(string)
				if _, err := svc.Authenticate(t.Context(), tt.user, key); err != nil {
					t.Fatalf("issued key does not authenticate: %v", err)
				}
				return
			}
			if got["error"] != tt.code {
				t.Fatalf("error code %v, want %q", got["error"], tt.code)
			}
		})
	}
}
