package archtest

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/vartalap/vartalap/"

// services never import each other (DESIGN.md §2): data crosses a service
// boundary only as schema types on NATS subjects, wired by cmd/vartalap.
var services = []string{"gateway", "router", "delivery", "groups", "profile", "push"}

func TestServicesDoNotImportSiblings(t *testing.T) {
	root := filepath.Join("..", "..")
	for _, svc := range services {
		dir := filepath.Join(root, svc)
		if _, err := os.Stat(dir); err != nil {
			continue // not written yet
		}
		err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") {
				return err
			}
			f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
			if err != nil {
				return err
			}
			for _, imp := range f.Imports {
				p, _ := strconv.Unquote(imp.Path.Value)
				if !strings.HasPrefix(p, module) {
					continue
				}
				first := strings.SplitN(strings.TrimPrefix(p, module), "/", 2)[0]
				for _, other := range services {
					if other != svc && first == other {
						t.Errorf("%s imports %s: service packages must not import each other", path, p)
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// schema is the wire contract: standard library and the protobuf runtime only.
func TestSchemaImportsOnlyStdlibAndProtobuf(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "..", "schema", "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no schema files found")
	}
	for _, path := range files {
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			first := strings.SplitN(p, "/", 2)[0]
			if strings.Contains(first, ".") && !strings.HasPrefix(p, "google.golang.org/protobuf/") {
				t.Errorf("%s imports %s: schema may only use the standard library and the protobuf runtime", path, p)
			}
		}
	}
}
