package webclient

import (
	"io/fs"
	"strings"
	"testing"
)

func TestFSHasTheClient(t *testing.T) {
	files := FS()
	tests := []struct {
		name string
		file string
		want []string // substrings the file must contain
	}{
		{"index references assets", "index.html", []string{`src="app.js"`, `href="style.css"`, `type="module"`}},
		{"index has the ids the e2e script drives", "index.html", []string{
			`id="login-username"`, `id="login-submit"`, `id="new-chat"`, `id="compose-input"`,
			`id="compose-send"`, `id="new-group-name"`, `id="new-group-members"`, `id="new-group-submit"`,
		}},
		{"app uses the versioned routes", "app.js", []string{"'/v1.0'", "/wss/?format=text&ack=true", "CLIENT_ACK"}},
		{"style exists", "style.css", []string{".message"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := fs.ReadFile(files, tc.file)
			if err != nil {
				t.Fatalf("read %s: %v", tc.file, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(string(b), w) {
					t.Errorf("%s does not contain %q", tc.file, w)
				}
			}
		})
	}
}

// TestFSNoExternalReferences keeps the client self-contained: nothing is
// loaded from another origin.
func TestFSNoExternalReferences(t *testing.T) {
	err := fs.WalkDir(FS(), ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(FS(), p)
		if err != nil {
			return err
		}
		for _, bad := range []string{"http://", "https://", "//cdn", "@import"} {
			if strings.Contains(string(b), bad) {
				t.Errorf("%s references %q", p, bad)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
