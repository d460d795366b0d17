package taskgateclient

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The imports a fragment of docs/clients.md may use, by the name it uses them with.
var fragmentImports = map[string]string{
	"context":        `"context"`,
	"fmt":            `"fmt"`,
	"log":            `"log"`,
	"time":           `"time"`,
	"status":         `"google.golang.org/grpc/status"`,
	"taskgateclient": `"taskgateclient"`,
	"taskgatev1":     `taskgatev1 "taskgate/v1"`,
}

var (
	goBlock = regexp.MustCompile("(?s)```go\n(.*?)```")
	comment = regexp.MustCompile(`//.*`)
)

// goExamples are the Go blocks of docs/clients.md's two Go sections, in order.
func goExamples(t *testing.T) []string {
	t.Helper()
	text, err := os.ReadFile("../../docs/clients.md")
	if err != nil {
		t.Fatal(err)
	}
	var examples []string
	for _, heading := range []string{"\n## Go\n", "\n### Go\n"} {
		section := string(text)
		start := strings.Index(section, heading)
		if start < 0 {
			t.Fatalf("docs/clients.md has no %q section", strings.TrimSpace(heading))
		}
		section = section[start+len(heading):]
		if end := strings.Index(section, "\n#"); end >= 0 {
			section = section[:end]
		}
		for _, match := range goBlock.FindAllStringSubmatch(section, -1) {
			examples = append(examples, match[1])
		}
	}
	return examples
}

// TestTheDocsGoExamplesBuild builds every Go example of docs/clients.md against the generated
// code and this package, so that what a reader copies compiles: a whole program as it is, a
// fragment as the body of a function given what the text around it names (ctx, client, the
// stub, gateway, the handlers).
func TestTheDocsGoExamplesBuild(t *testing.T) {
	examples := goExamples(t)
	if len(examples) < 4 {
		t.Fatalf("docs/clients.md has %d Go examples; the stub and the client, for a call and for a watch, are 4", len(examples))
	}
	for number, example := range examples {
		source := example
		if !strings.HasPrefix(example, "package main\n") {
			var imports []string
			code := comment.ReplaceAllString(example, "")
			for name, path := range fragmentImports {
				if strings.Contains(code, name+".") || name == "context" || name == "taskgateclient" || name == "taskgatev1" {
					imports = append(imports, path)
				}
			}
			source = "package main\n\nimport (\n" + strings.Join(imports, "\n") + "\n)\n\n" +
				"func handleState(*taskgatev1.CaseGetStateResponse) error { return nil }\n" +
				"func handleEvent(*taskgatev1.CaseEvent) error { return nil }\n" +
				"func example(ctx context.Context, client taskgatev1.TaskServiceClient, gateway *taskgateclient.Client) {\n" +
				example + "}\n\nfunc main() { example(context.Background(), nil, nil) }\n"
		}
		folder := t.TempDir()
		if err := os.WriteFile(filepath.Join(folder, "main.go"), []byte(source), 0o600); err != nil {
			t.Fatal(err)
		}
		build := exec.Command("go", "vet", "main.go")
		build.Dir = folder
		if output, err := build.CombinedOutput(); err != nil {
			t.Errorf("example %d of docs/clients.md's Go sections does not build (%v):\n%s\n%s", number+1, err, output, example)
		}
	}
}
