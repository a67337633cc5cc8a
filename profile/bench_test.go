package profile_test

import (
	"fmt"
	"testing"

	"github.com/vartalap/vartalap/profile"
)

// BenchmarkAuthenticate measures the access-key check every request and
// socket makes, for a user with four devices.
func BenchmarkAuthenticate(b *testing.B) {
	e := newEnv(b, profile.Config{})
	var key string
	for i := range 4 {
		key = e.login("alice", fmt.Sprintf("dev%d", i), "").AccessKey
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.svc.Authenticate(b.Context(), "alice", key); err != nil {
			b.Fatal(err)
		}
	}
}
