package profile_test

import (
	"encoding/json"
	"maps"
	"net/http"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/profile"
)

func TestContactSync(t *testing.T) {
	e := newEnv(t, profile.Config{MaxContacts: 4})
	alice := creds{"alice", e.login("alice", "default", "").AccessKey}
	e.login("bob", "default", "")
	e.login("+919999999999", "default", "")

	tests := []struct {
		name   string
		path   string
		body   any
		status int
		want   map[string]bool
	}{
		{"registered users only", "/contactbook/sync", map[string]any{"users": []string{"bob", "carol", "+919999999999", "bob"}}, 200,
			map[string]bool{"bob": true, "+919999999999": true}},
		{"invalid usernames skipped", "/contactbook/sync", map[string]any{"users": []string{"bob.>", "", "b o b", "bob"}}, 200,
			map[string]bool{"bob": true}},
		{"v1.0 prefix", "/v1.0/contactbook/sync", map[string]any{"users": []string{"alice"}}, 200, map[string]bool{"alice": true}},
		{"empty list", "/contactbook/sync", map[string]any{"users": []string{}}, 200, map[string]bool{}},
		{"legacy user/sync", "/profile/user/sync", map[string]any{"users": []string{"bob", "dave"}}, 200, map[string]bool{"bob": true}},
		{"legacy contactbook/sync", "/profile/contactbook/sync", map[string]any{"users": []string{"bob"}}, 200, map[string]bool{"bob": true}},
		{"legacy user/sync, users missing", "/profile/user/sync", map[string]any{}, 200, map[string]bool{}},
		{"legacy contactbook/sync, users missing", "/v1.0/profile/contactbook/sync", map[string]any{}, 200, map[string]bool{}},
		{"users missing", "/contactbook/sync", map[string]any{}, 400, nil},
		{"over the limit", "/contactbook/sync", map[string]any{"users": []string{"a", "b", "c", "d", "bob"}}, 400, nil},
		{"legacy over the limit", "/profile/user/sync", map[string]any{"users": []string{"a", "b", "c", "d", "bob"}}, 400, nil},
		{"users not a list", "/contactbook/sync", `{"users":"bob"}`, 400, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("POST", tt.path, tt.body, &alice, nil)
			if tt.status != 200 {
				eb := r.errorBody(t, tt.status, api.CodeBadRequest)
				if !strings.HasPrefix(eb.Message, "users:") && !strings.HasPrefix(eb.Message, "malformed") {
					t.Errorf("message %q does not name the field", eb.Message)
				}
				return
			}
			if r.status != 200 {
				t.Fatalf("status %d body %s", r.status, r.body)
			}
			var got map[string]bool
			r.json(t, &got)
			if !maps.Equal(got, tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}

	// The caller's syncAt was recorded; read the file directly.
	e.close()
	db, err := bolt.Open(e.path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var rec struct {
		SyncAt time.Time `json:"syncAt"`
	}
	var bobHasSync bool
	err = db.View(func(tx *bolt.Tx) error {
		users := tx.Bucket([]byte("users"))
		bobHasSync = strings.Contains(string(users.Get([]byte("bob"))), "syncAt")
		return json.Unmarshal(users.Get([]byte("alice")), &rec)
	})
	if err != nil {
		t.Fatal(err)
	}
	if rec.SyncAt.IsZero() || time.Since(rec.SyncAt) > time.Hour {
		t.Fatalf("alice's syncAt = %v, want recent", rec.SyncAt)
	}
	if bobHasSync {
		t.Fatal("bob never synced but has a syncAt")
	}
}

func TestGetProfile(t *testing.T) {
	e := newEnv(t, profile.Config{})
	alice := creds{"alice", e.login("alice", "default", "").AccessKey}
	for _, path := range []string{"/profile/", "/profile/get", "/v1.0/profile/", "/v1.0/profile/get"} {
		t.Run(path, func(t *testing.T) {
			r := e.do("GET", path, nil, &alice, nil)
			if r.status != 200 || strings.TrimSpace(string(r.body)) != `{"username":"alice"}` {
				t.Fatalf("got %d %s", r.status, r.body)
			}
		})
	}
}

func TestPushTokenUpdate(t *testing.T) {
	e := newEnv(t, profile.Config{})
	phone := creds{"alice", e.login("alice", "phone", "fcm-old").AccessKey}
	e.login("alice", "web", "web-token")
	bob := creds{"bob", e.login("bob", "phone", "bob-token").AccessKey}

	tests := []struct {
		name   string
		c      creds
		path   string
		body   any
		status int
		code   string
	}{
		{"own device", phone, "/profile/devices/phone/token", map[string]any{"token": "fcm-new"}, 200, ""},
		{"own device, v1.0", phone, "/v1.0/profile/devices/phone/token", map[string]any{"token": "fcm-new"}, 200, ""},
		{"another device of the same user", phone, "/profile/devices/web/token", map[string]any{"token": "stolen"}, 403, api.CodeForbidden},
		{"another user's device id", bob, "/profile/devices/web/token", map[string]any{"token": "stolen"}, 403, api.CodeForbidden},
		{"missing token", phone, "/profile/devices/phone/token", map[string]any{}, 400, api.CodeBadRequest},
		{"token too long", phone, "/profile/devices/phone/token", map[string]any{"token": strings.Repeat("t", 4097)}, 400, api.CodeBadRequest},
		{"malformed JSON", phone, "/profile/devices/phone/token", `{"token":`, 400, api.CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("PUT", tt.path, tt.body, &tt.c, nil)
			if tt.status != 200 {
				r.errorBody(t, tt.status, tt.code)
				return
			}
			if r.status != 200 {
				t.Fatalf("status %d body %s", r.status, r.body)
			}
		})
	}
	devs, err := e.svc.Devices(t.Context(), "alice")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, d := range devs {
		got[string(d.ID)] = d.PushToken
	}
	if !maps.Equal(got, map[string]string{"phone": "fcm-new", "web": "web-token"}) {
		t.Fatalf("tokens = %v", got)
	}
	if bd, _ := e.svc.Devices(t.Context(), "bob"); len(bd) != 1 || bd[0].PushToken != "bob-token" {
		t.Fatalf("bob's devices = %+v", bd)
	}
}

func TestListOwnDevices(t *testing.T) {
	e := newEnv(t, profile.Config{})
	phone := creds{"alice", e.login("alice", "phone", "secret-fcm-token").AccessKey}
	e.login("alice", "web", "")
	e.login("bob", "tablet", "x")

	r := e.do("GET", "/profile/devices", nil, &phone, nil)
	if r.status != http.StatusOK {
		t.Fatalf("status %d body %s", r.status, r.body)
	}
	if strings.Contains(string(r.body), "secret-fcm-token") {
		t.Fatal("device list leaks the push token")
	}
	var got []struct {
		DeviceID       string    `json:"deviceId"`
		MessageVersion float64   `json:"messageVersion"`
		AddedOn        time.Time `json:"addedOn"`
		LastLogin      time.Time `json:"lastLogin"`
		HasToken       bool      `json:"hasToken"`
		Current        bool      `json:"current"`
	}
	r.json(t, &got)
	if len(got) != 2 {
		t.Fatalf("got %d devices: %s", len(got), r.body)
	}
	if got[0].DeviceID != "phone" || !got[0].HasToken || !got[0].Current || got[0].MessageVersion != 2.1 || got[0].AddedOn.IsZero() || got[0].LastLogin.IsZero() {
		t.Errorf("phone = %+v", got[0])
	}
	if got[1].DeviceID != "web" || got[1].HasToken || got[1].Current {
		t.Errorf("web = %+v", got[1])
	}
}
