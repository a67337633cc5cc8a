package profile_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/profile"
	"github.com/vartalap/vartalap/schema"
)

func TestNewValidatesConfig(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		cfg  profile.Config
	}{
		{"missing path", profile.Config{Verifier: profile.DevVerifier{}}},
		{"missing verifier", profile.Config{Path: filepath.Join(dir, "a.db")}},
		{"negative max contacts", profile.Config{Path: filepath.Join(dir, "b.db"), Verifier: profile.DevVerifier{}, MaxContacts: -1}},
		{"path is a directory", profile.Config{Path: dir, Verifier: profile.DevVerifier{}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc, err := profile.New(tt.cfg)
			if err == nil {
				svc.Close()
				t.Fatal("New succeeded, want an error")
			}
		})
	}
}

func TestSecondOpenOfLockedFileFails(t *testing.T) {
	e := newEnv(t, profile.Config{})
	start := time.Now()
	svc, err := profile.New(profile.Config{Path: e.path, Verifier: profile.DevVerifier{}, OpenTimeout: 100 * time.Millisecond})
	if err == nil {
		svc.Close()
		t.Fatal("second New on an open file succeeded")
	}
	if !strings.Contains(err.Error(), "locked") {
		t.Errorf("error %q does not say the file is locked", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("second New took %v", d)
	}
}

func TestLoginValidation(t *testing.T) {
	e := newEnv(t, profile.Config{Verifier: tableVerifier{"good": {UID: "u1"}}})
	tests := []struct {
		name    string
		body    any
		header  map[string]string
		status  int
		code    string
		message string // prefix of the error message
	}{
		{"malformed JSON", `{"username":`, nil, 400, api.CodeBadRequest, "malformed"},
		{"username not a string", `{"username":919999999999,"authToken":"good"}`, nil, 400, api.CodeBadRequest, "malformed"},
		{"missing username", map[string]any{"authToken": "good"}, nil, 400, api.CodeBadRequest, "username:"},
		{"username with dot", map[string]any{"username": "a.b", "authToken": "good"}, nil, 400, api.CodeBadRequest, "username:"},
		{"username with wildcard", map[string]any{"username": "a*", "authToken": "good"}, nil, 400, api.CodeBadRequest, "username:"},
		{"username too long", map[string]any{"username": strings.Repeat("a", 65), "authToken": "good"}, nil, 400, api.CodeBadRequest, "username:"},
		{"reserved username", map[string]any{"username": "server", "authToken": "good"}, nil, 400, api.CodeBadRequest, "username:"},
		{"deviceId with space", map[string]any{"username": "alice", "deviceId": "my phone", "authToken": "good"}, nil, 400, api.CodeBadRequest, "deviceId:"},
		{"deviceId with gt", map[string]any{"username": "alice", "deviceId": "a>", "authToken": "good"}, nil, 400, api.CodeBadRequest, "deviceId:"},
		{"push token too long", map[string]any{"username": "alice", "notificationToken": strings.Repeat("t", 4097), "authToken": "good"}, nil, 400, api.CodeBadRequest, "notificationToken:"},
		{"negative message version", map[string]any{"username": "alice", "messageVersion": -1, "authToken": "good"}, nil, 400, api.CodeBadRequest, "messageVersion:"},
		{"missing token", map[string]any{"username": "alice"}, nil, 401, api.CodeUnauthenticated, "missing login token"},
		{"bad token", map[string]any{"username": "alice", "authToken": "forged"}, nil, 401, api.CodeUnauthenticated, "invalid login token"},
		{"bad header token", map[string]any{"username": "alice"}, map[string]string{"token": "forged"}, 401, api.CodeUnauthenticated, "invalid login token"},
		{"verifier unavailable", map[string]any{"username": "alice", "authToken": "unavailable"}, nil, 503, api.CodeUnavailable, ""},
		{"body too large", `{"username":"alice","authToken":"` + strings.Repeat("x", 64<<10) + `"}`, nil, 413, api.CodeTooLarge, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("POST", "/login", tt.body, nil, tt.header)
			eb := r.errorBody(t, tt.status, tt.code)
			if !strings.HasPrefix(eb.Message, tt.message) {
				t.Errorf("message = %q, want prefix %q", eb.Message, tt.message)
			}
		})
	}
	// Nothing was stored by the rejected logins.
	devs, err := e.svc.Devices(t.Context(), "alice")
	if err != nil || len(devs) != 0 {
		t.Fatalf("Devices after rejected logins = %v, %v; want none", devs, err)
	}
}

func TestLoginSucceeds(t *testing.T) {
	e := newEnv(t, profile.Config{Verifier: tableVerifier{"good": {UID: "u1"}}})
	tests := []struct {
		name   string
		path   string
		body   any
		header map[string]string
		user   string
		device schema.DeviceID
		isNew  bool
	}{
		{"new user, default device", "/login", map[string]any{"username": "alice", "authToken": "good", "notificationToken": "fcm-1"}, nil, "alice", "default", true},
		{"existing user, second device", "/login", map[string]any{"username": "alice", "authToken": "good", "deviceId": "web"}, nil, "alice", "web", false},
		{"token from header", "/login", map[string]any{"username": "bob", "deviceId": "phone"}, map[string]string{"token": "good"}, "bob", "phone", true},
		{"v1.0 prefix", "/v1.0/login", map[string]any{"username": "+919999999999", "authToken": "good", "messageVersion": 2}, nil, "+919999999999", "default", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("POST", tt.path, tt.body, nil, tt.header)
			if r.status != http.StatusOK {
				t.Fatalf("status %d body %s", r.status, r.body)
			}
			var lr loginResp
			r.json(t, &lr)
			if !lr.Status || lr.Username != tt.user || lr.IsNew != tt.isNew {
				t.Fatalf("reply %+v, want user %q isNew %v", lr, tt.user, tt.isNew)
			}
			raw, err := base64.RawURLEncoding.DecodeString(lr.AccessKey)
			if err != nil || len(raw) != 32 {
				t.Fatalf("access key %q is not 32 bytes of base64url: %v", lr.AccessKey, err)
			}
			id, err := e.svc.Authenticate(t.Context(), tt.user, lr.AccessKey)
			if err != nil || id != (api.Identity{User: schema.UserID(tt.user), Device: tt.device}) {
				t.Fatalf("Authenticate = %+v, %v; want %s/%s", id, err, tt.user, tt.device)
			}
		})
	}
	devs, err := e.svc.Devices(t.Context(), "alice")
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 2 || devs[0].ID != "default" || devs[0].PushToken != "fcm-1" || devs[0].MessageVersion != 2.1 ||
		devs[1].ID != "web" || devs[1].PushToken != "" || devs[0].AddedOn.IsZero() || devs[0].LastLogin.IsZero() {
		t.Fatalf("devices of alice = %+v", devs)
	}
	plus, err := e.svc.Devices(t.Context(), "+919999999999")
	if err != nil || len(plus) != 1 || plus[0].MessageVersion != 2 {
		t.Fatalf("devices of +919999999999 = %+v, %v", plus, err)
	}
}

func TestLoginBindsUsername(t *testing.T) {
	e := newEnv(t, profile.Config{
		BindUsername: true,
		Verifier: tableVerifier{
			"phone":  {UID: "fbuid1", Phone: "+919999999999"},
			"nophon": {UID: "fbuid2"},
		},
	})
	tests := []struct {
		name, user, token string
		ok                bool
	}{
		{"E.164 phone", "+919999999999", "phone", true},
		{"phone without plus", "919999999999", "phone", true},
		{"token uid", "fbuid1", "phone", true},
		{"uid of token without phone", "fbuid2", "nophon", true},
		{"someone else's number", "+918888888888", "phone", false},
		{"national number only", "9999999999", "phone", false},
		{"other user", "alice", "nophon", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("POST", "/login", map[string]any{"username": tt.user, "authToken": tt.token}, nil, nil)
			if tt.ok {
				if r.status != http.StatusOK {
					t.Fatalf("status %d body %s, want 200", r.status, r.body)
				}
				return
			}
			r.errorBody(t, http.StatusUnauthorized, "username_mismatch")
			if devs, _ := e.svc.Devices(t.Context(), schema.UserID(tt.user)); len(devs) != 0 {
				t.Fatalf("rejected login stored devices %+v", devs)
			}
		})
	}
}

func TestAccessKeysStoredOnlyHashed(t *testing.T) {
	e := newEnv(t, profile.Config{})
	keys := []string{e.login("alice", "phone", "fcm").AccessKey, e.login("alice", "web", "").AccessKey}
	e.close()
	raw, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if bytes.Contains(raw, []byte(k)) {
			t.Errorf("raw access key %q found in the bbolt file", k)
		}
		dec, _ := base64.RawURLEncoding.DecodeString(k)
		if bytes.Contains(raw, dec) {
			t.Errorf("decoded access key bytes found in the bbolt file")
		}
		sum := sha256.Sum256([]byte(k))
		if !bytes.Contains(raw, []byte(base64.StdEncoding.EncodeToString(sum[:]))) {
			t.Errorf("SHA-256 of access key not found in the bbolt file: the test is not looking at the right data")
		}
	}
}

func TestDeviceKeysAndRelogin(t *testing.T) {
	ns := natstest.Start(t)
	nc := ns.Connect(t)
	sub := kickSub(t, nc)
	e := newEnv(t, profile.Config{NC: nc})

	const user = "+919999999999"
	phone1 := e.login(user, "phone", "fcm-1").AccessKey
	web := e.login(user, "web", "").AccessKey
	if phone1 == web {
		t.Fatal("two devices got the same key")
	}
	for _, c := range []struct {
		key    string
		device schema.DeviceID
	}{{phone1, "phone"}, {web, "web"}} {
		id, err := e.svc.Authenticate(t.Context(), user, c.key)
		if err != nil || id.Device != c.device {
			t.Fatalf("Authenticate(%s key) = %+v, %v", c.device, id, err)
		}
	}
	// First logins of a device kick nobody: the service publishes on nc, so
	// a marker published now arrives after any kick it sent.
	marker := schema.Kick("marker", "x")
	if err := nc.Publish(marker, nil); err != nil {
		t.Fatal(err)
	}
	if m, err := sub.NextMsg(5 * time.Second); err != nil || m.Subject != marker {
		t.Fatalf("first message = %v, %v; want only the marker (no kick on first login)", m, err)
	}

	phone2 := e.login(user, "phone", "fcm-2").AccessKey
	tests := []struct {
		name   string
		key    string
		status int
	}{
		{"replaced key", phone1, 401},
		{"new key", phone2, 200},
		{"other device's key", web, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := e.authStatus(creds{user, tt.key}); got != tt.status {
				t.Fatalf("status %d, want %d", got, tt.status)
			}
		})
	}
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no kick after re-login: %v", err)
	}
	if m.Subject != schema.Kick(user, "phone") || string(m.Data) != `{"reason":"key_replaced"}` {
		t.Fatalf("kick = %s %s", m.Subject, m.Data)
	}
	devs, _ := e.svc.Devices(t.Context(), user)
	if len(devs) != 2 || devs[0].ID != "phone" || devs[0].PushToken != "fcm-2" {
		t.Fatalf("devices after re-login = %+v", devs)
	}
}

func TestLogout(t *testing.T) {
	ns := natstest.Start(t)
	nc := ns.Connect(t)
	sub := kickSub(t, nc)
	e := newEnv(t, profile.Config{NC: nc})
	phone := e.login("alice", "phone", "fcm-phone").AccessKey
	web := e.login("alice", "web", "fcm-web").AccessKey

	r := e.do("POST", "/v1.0/logout", nil, &creds{"alice", phone}, nil)
	if r.status != http.StatusOK || strings.TrimSpace(string(r.body)) != `{"status":true}` {
		t.Fatalf("logout: %d %s", r.status, r.body)
	}
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no kick after logout: %v", err)
	}
	if m.Subject != schema.Kick("alice", "phone") || string(m.Data) != `{"reason":"logout"}` {
		t.Fatalf("kick = %s %s", m.Subject, m.Data)
	}
	if got := e.authStatus(creds{"alice", phone}); got != http.StatusUnauthorized {
		t.Fatalf("logged-out key: status %d, want 401", got)
	}
	if got := e.authStatus(creds{"alice", web}); got != http.StatusOK {
		t.Fatalf("other device's key after logout: status %d, want 200", got)
	}
	devs, err := e.svc.Devices(t.Context(), "alice")
	if err != nil || len(devs) != 1 || devs[0].ID != "web" || devs[0].PushToken != "fcm-web" {
		t.Fatalf("devices after logout = %+v, %v", devs, err)
	}
	// A second logout with the revoked key is unauthenticated.
	e.do("POST", "/logout", nil, &creds{"alice", phone}, nil).errorBody(t, http.StatusUnauthorized, api.CodeUnauthenticated)
}

func TestAuthenticate(t *testing.T) {
	e := newEnv(t, profile.Config{})
	alice := e.login("alice", "phone", "").AccessKey
	bob := e.login("bob", "phone", "").AccessKey
	plus := e.login("+919999999999", "web", "").AccessKey

	tests := []struct {
		name string
		user string
		key  string
		ok   bool
	}{
		{"own key", "alice", alice, true},
		{"plus user", "+919999999999", plus, true},
		{"wrong key", "alice", flipLast(alice), false},
		{"another user's key", "alice", bob, false},
		{"unknown user", "carol", alice, false},
		{"invalid user", "alice.>", alice, false},
		{"empty key", "alice", "", false},
		{"huge key", "alice", strings.Repeat("k", 10000), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := e.svc.Authenticate(t.Context(), tt.user, tt.key)
			if tt.ok {
				if err != nil || string(id.User) != tt.user {
					t.Fatalf("Authenticate = %+v, %v", id, err)
				}
				return
			}
			if !errors.Is(err, api.ErrUnauthenticated) {
				t.Fatalf("Authenticate err = %v, want ErrUnauthenticated", err)
			}
		})
	}
}

func TestHTTPAuthHeadersAndCookies(t *testing.T) {
	e := newEnv(t, profile.Config{})
	key := e.login("+919999999999", "phone", "").AccessKey
	other := e.login("bob", "phone", "").AccessKey
	tests := []struct {
		name    string
		headers map[string]string
		cookies map[string]string
		status  int
	}{
		{"headers", map[string]string{"user": "+919999999999", "accesskey": key}, nil, 200},
		{"cookies, URL-encoded", nil, map[string]string{"user": "%2B919999999999", "accesskey": key}, 200},
		{"wrong key", map[string]string{"user": "+919999999999", "accesskey": "nope"}, nil, 401},
		{"another user's key", map[string]string{"user": "+919999999999", "accesskey": other}, nil, 401},
		{"unknown user", map[string]string{"user": "carol", "accesskey": key}, nil, 401},
		{"no credentials", nil, nil, 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest("GET", e.srv.URL+"/profile/", nil)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tt.headers {
				req.Header.Set(k, v)
			}
			for k, v := range tt.cookies {
				req.AddCookie(&http.Cookie{Name: k, Value: v})
			}
			r := e.send(req)
			if tt.status == 200 {
				if r.status != 200 || strings.TrimSpace(string(r.body)) != `{"username":"+919999999999"}` {
					t.Fatalf("got %d %s", r.status, r.body)
				}
				return
			}
			r.errorBody(t, tt.status, api.CodeUnauthenticated)
		})
	}
}

func TestEveryAuthenticatedRouteRequiresCredentials(t *testing.T) {
	e := newEnv(t, profile.Config{})
	key := e.login("alice", "default", "").AccessKey
	routes := []struct{ method, path string }{
		{"POST", "/logout"},
		{"GET", "/profile/"},
		{"GET", "/profile/get"},
		{"POST", "/contactbook/sync"},
		{"POST", "/profile/contactbook/sync"},
		{"POST", "/profile/user/sync"},
		{"GET", "/profile/devices"},
		{"PUT", "/profile/devices/default/token"},
	}
	for _, rt := range routes {
		for _, prefix := range []string{"", "/v1.0"} {
			t.Run(rt.method+" "+prefix+rt.path, func(t *testing.T) {
				body := `{"users":[],"token":"t"}`
				e.do(rt.method, prefix+rt.path, body, nil, nil).errorBody(t, http.StatusUnauthorized, api.CodeUnauthenticated)
				e.do(rt.method, prefix+rt.path, body, &creds{"alice", "wrong"}, nil).errorBody(t, http.StatusUnauthorized, api.CodeUnauthenticated)
			})
		}
	}
	// The key still works: the loop above never logged out.
	if got := e.authStatus(creds{"alice", key}); got != 200 {
		t.Fatalf("status %d with a valid key", got)
	}
}

func TestDataSurvivesReopen(t *testing.T) {
	e := newEnv(t, profile.Config{})
	key := e.login("alice", "phone", "fcm").AccessKey
	before, err := e.svc.Devices(t.Context(), "alice")
	if err != nil {
		t.Fatal(err)
	}
	e.reopen()
	id, err := e.svc.Authenticate(t.Context(), "alice", key)
	if err != nil || id.Device != "phone" {
		t.Fatalf("Authenticate after reopen = %+v, %v", id, err)
	}
	after, err := e.svc.Devices(t.Context(), "alice")
	if err != nil || len(after) != 1 || after[0].PushToken != "fcm" || !after[0].AddedOn.Equal(before[0].AddedOn) {
		t.Fatalf("devices after reopen = %+v, %v; before %+v", after, err, before)
	}
	r := e.do("POST", "/login", map[string]any{"username": "alice", "authToken": "x", "deviceId": "web"}, nil, nil)
	var lr loginResp
	r.json(t, &lr)
	if r.status != 200 || lr.IsNew {
		t.Fatalf("login after reopen: %d %+v, want existing user", r.status, lr)
	}
}

func TestDevVerifier(t *testing.T) {
	var v profile.DevVerifier
	if _, err := v.Verify(context.Background(), ""); !errors.Is(err, profile.ErrBadToken) {
		t.Fatalf("empty token: err = %v, want ErrBadToken", err)
	}
	c, err := v.Verify(context.Background(), "test")
	if err != nil || c.UID != "test" {
		t.Fatalf("Verify(test) = %+v, %v", c, err)
	}
}

// flipLast returns key with its last character changed (to a different one).
func flipLast(key string) string {
	last := "A"
	if strings.HasSuffix(key, "A") {
		last = "B"
	}
	return key[:len(key)-1] + last
}
