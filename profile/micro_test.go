package profile_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/vartalap/vartalap/internal/api"
	"github.com/vartalap/vartalap/internal/natstest"
	"github.com/vartalap/vartalap/profile"
	"github.com/vartalap/vartalap/schema"
)

// runService starts s.Run and returns a stop function that cancels it and
// checks it returned nil.
func runService(t *testing.T, s *profile.Service) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	return func() {
		t.Helper()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Run did not return after cancel")
		}
	}
}

// primeRequests makes nc create its shared reply subscription (and its
// goroutine, which lives as long as nc) before a leak check's snapshot.
func primeRequests(t *testing.T, nc *nats.Conn) {
	t.Helper()
	if _, err := nc.Request("profile.prime", nil, time.Second); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("prime request: %v", err)
	}
}

// waitForService polls until the micro service answers on subject.
func waitForService(t *testing.T, nc *nats.Conn, subject string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := nc.Request(subject, []byte(`{}`), time.Second)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("service not answering on %s: %v", subject, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMicroClient(t *testing.T) {
	ns := natstest.Start(t)
	svcConn := ns.Connect(t)
	clientConn := ns.Connect(t)
	e := newEnv(t, profile.Config{NC: svcConn})
	alice := e.login("alice", "phone", "fcm-1").AccessKey
	web := e.login("alice", "web", "").AccessKey
	bob := e.login("+919999999999", "default", "bob-token").AccessKey
	primeRequests(t, clientConn)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	stop := runService(t, e.svc)
	defer stop()
	waitForService(t, clientConn, "profile.devices")
	c := profile.NewClient(clientConn, 5*time.Second)

	t.Run("authenticate matches local", func(t *testing.T) {
		tests := []struct {
			name, user, key string
		}{
			{"phone key", "alice", alice},
			{"web key", "alice", web},
			{"plus user", "+919999999999", bob},
			{"wrong key", "alice", "wrong"},
			{"another user's key", "alice", bob},
			{"unknown user", "carol", alice},
			{"invalid user", "al.ice", alice},
			{"empty key", "alice", ""},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				want, wantErr := e.svc.Authenticate(t.Context(), tt.user, tt.key)
				got, err := c.Authenticate(t.Context(), tt.user, tt.key)
				if got != want || errors.Is(err, api.ErrUnauthenticated) != errors.Is(wantErr, api.ErrUnauthenticated) || (err == nil) != (wantErr == nil) {
					t.Fatalf("client = %+v, %v; local = %+v, %v", got, err, want, wantErr)
				}
			})
		}
	})

	t.Run("devices", func(t *testing.T) {
		want, err := e.svc.Devices(t.Context(), "alice")
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.Devices(t.Context(), "alice")
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 2 || len(got) != len(want) {
			t.Fatalf("client devices = %+v, local %+v", got, want)
		}
		for i := range got {
			if got[i].ID != want[i].ID || got[i].PushToken != want[i].PushToken || got[i].MessageVersion != want[i].MessageVersion ||
				!got[i].AddedOn.Equal(want[i].AddedOn) || !got[i].LastLogin.Equal(want[i].LastLogin) {
				t.Fatalf("device %d: client %+v, local %+v", i, got[i], want[i])
			}
		}
		none, err := c.Devices(t.Context(), "nobody")
		if err != nil || len(none) != 0 {
			t.Fatalf("devices of unknown user = %+v, %v", none, err)
		}
		if _, err := c.Devices(t.Context(), "bad.user"); !errors.Is(err, schema.ErrInvalidID) {
			t.Fatalf("devices of invalid user: err = %v, want ErrInvalidID", err)
		}
	})

	t.Run("remove token only when it matches", func(t *testing.T) {
		token := func(user schema.UserID, dev schema.DeviceID) string {
			devs, err := e.svc.Devices(t.Context(), user)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range devs {
				if d.ID == dev {
					return d.PushToken
				}
			}
			t.Fatalf("no device %s/%s", user, dev)
			return ""
		}
		steps := []struct {
			name          string
			user          schema.UserID
			device        schema.DeviceID
			token         string
			wantAfter     string
			wantOtherUser string
		}{
			{"stale token is kept", "alice", "phone", "fcm-0", "fcm-1", "bob-token"},
			{"token of another device", "alice", "phone", "bob-token", "fcm-1", "bob-token"},
			{"unknown device is not an error", "alice", "tablet", "fcm-1", "fcm-1", "bob-token"},
			{"matching token is removed", "alice", "phone", "fcm-1", "", "bob-token"},
		}
		for _, st := range steps {
			if err := c.RemoveToken(t.Context(), st.user, st.device, st.token); err != nil {
				t.Fatalf("%s: RemoveToken: %v", st.name, err)
			}
			if got := token("alice", "phone"); got != st.wantAfter {
				t.Fatalf("%s: token = %q, want %q", st.name, got, st.wantAfter)
			}
			if got := token("+919999999999", "default"); got != st.wantOtherUser {
				t.Fatalf("%s: other user's token = %q", st.name, got)
			}
		}
		// A re-login brings a new token; removing the old one keeps it.
		e.login("alice", "phone", "fcm-2")
		if err := c.RemoveToken(t.Context(), "alice", "phone", "fcm-1"); err != nil {
			t.Fatal(err)
		}
		if got := token("alice", "phone"); got != "fcm-2" {
			t.Fatalf("token after re-login and stale removal = %q, want fcm-2", got)
		}
		if err := c.RemoveToken(t.Context(), "alice", "bad device", "x"); !errors.Is(err, schema.ErrInvalidID) {
			t.Fatalf("invalid device: err = %v", err)
		}
	})

	t.Run("malformed request gets a micro error", func(t *testing.T) {
		m, err := clientConn.Request("profile.auth", []byte("not json"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if m.Header.Get("Nats-Service-Error-Code") != "400" {
			t.Fatalf("reply headers %v", m.Header)
		}
	})
}

func TestClientWithoutService(t *testing.T) {
	ns := natstest.Start(t)
	c := profile.NewClient(ns.Connect(t), time.Second)
	_, err := c.Authenticate(t.Context(), "alice", "key")
	if err == nil || errors.Is(err, api.ErrUnauthenticated) {
		t.Fatalf("err = %v, want a non-auth failure (so the edge answers 503, not 401)", err)
	}
	if !errors.Is(err, nats.ErrNoResponders) && !strings.Contains(err.Error(), "timeout") {
		t.Fatalf("err = %v, want no responders or timeout", err)
	}
}

func TestRunStopsOnCancel(t *testing.T) {
	ns := natstest.Start(t)
	nc := ns.Connect(t)
	e := newEnv(t, profile.Config{NC: nc})
	primeRequests(t, nc)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	stop := runService(t, e.svc)
	waitForService(t, nc, "profile.auth")
	stop()
	if _, err := nc.Request("profile.auth", []byte(`{}`), time.Second); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("after Run returned: err = %v, want no responders", err)
	}
}

func TestRunWithoutConnection(t *testing.T) {
	e := newEnv(t, profile.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.svc.Run(ctx); err == nil {
		t.Fatal("Run without NC returned nil")
	}
}
