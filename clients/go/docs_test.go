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

// programOf is a Go example of docs/clients.md as a program: a whole program as it is, a
// fragment as the body of a function given what the text around it names (ctx, client, the
// stub, gateway, the handlers), which main calls.
func programOf(example string) string {
	if strings.HasPrefix(example, "package main\n") {
		return example
	}
	var imports []string
	code := comment.ReplaceAllString(example, "")
	for name, path := range fragmentImports {
		if strings.Contains(code, name+".") || name == "context" || name == "taskgateclient" || name == "taskgatev1" {
			imports = append(imports, path)
		}
	}
	return "package main\n\nimport (\n" + strings.Join(imports, "\n") + "\n)\n\n" +
		"func handleState(*taskgatev1.CaseGetStateResponse) error { return nil }\n" +
		"func handleEvent(*taskgatev1.CaseEvent) error { return nil }\n" +
		"func example(ctx context.Context, client taskgatev1.TaskServiceClient, gateway *taskgateclient.Client) {\n" +
		example + "}\n\nfunc main() { example(context.Background(), nil, nil) }\n"
}

// goCommand runs go with args in a new folder holding main.go, source.
func goCommand(t *testing.T, source string, args ...string) ([]byte, error) {
	t.Helper()
	folder := t.TempDir()
	if err := os.WriteFile(filepath.Join(folder, "main.go"), []byte(source), 0o600); err != nil {
		t.Fatal(err)
	}
	command := exec.Command("go", args...)
	command.Dir = folder
	return command.CombinedOutput()
}

// TestTheDocsGoExamplesBuild builds every Go example of docs/clients.md against the generated
// code and this package, so that what a reader copies compiles.
func TestTheDocsGoExamplesBuild(t *testing.T) {
	examples := goExamples(t)
	if len(examples) < 4 {
		t.Fatalf("docs/clients.md has %d Go examples; the stub and the client, for a call and for a watch, are 4", len(examples))
	}
	for number, example := range examples {
		if output, err := goCommand(t, programOf(example), "vet", "main.go"); err != nil {
			t.Errorf("example %d of docs/clients.md's Go sections does not build (%v):\n%s\n%s", number+1, err, output, example)
		}
	}
}

// The address the docs' examples connect to, and the words of their typed client's call.
const (
	docsAddress = `"127.0.0.1:50051"`
	typedCall   = "gateway.CaseExtract("
)

// TestTheDocsTypedClientExampleSucceedsOrSaysWhyNot runs the example of the typed client's
// CaseExtract against a gateway: on the simulator it prints ok; against a controller that
// drops every request, the first call's outcome is unknown, the repeat fails too, and the
// example must say so rather than end as if the case were extracted.
func TestTheDocsTypedClientExampleSucceedsOrSaysWhyNot(t *testing.T) {
	var example string
	for _, candidate := range goExamples(t) {
		if strings.Contains(candidate, typedCall) && strings.Contains(candidate, docsAddress) {
			example = candidate
		}
	}
	if example == "" {
		t.Fatalf("docs/clients.md has no Go example calling %s on %s", typedCall, docsAddress)
	}
	folder := t.TempDir()
	program := filepath.Join(folder, "example")
	source := strings.Replace(programOf(example), docsAddress, "os.Args[1]", 1)
	source = strings.Replace(source, "import (\n", "import (\n\"os\"\n", 1)
	if output, err := goCommand(t, source, "build", "-o", program, "main.go"); err != nil {
		t.Fatalf("the example does not build (%v):\n%s\n%s", err, output, source)
	}
	run := func(g *gateway) (string, error) {
		command := exec.Command(program, g.address)
		output, err := command.CombinedOutput()
		return string(output), err
	}

	if output, err := run(startGateway(t)); err != nil || !strings.HasPrefix(output, "ok ") {
		t.Errorf("on the simulator the example ended with %v, printing:\n%s", err, output)
	}

	controller := startFakeController(t, "drop")
	dropping := serve(t, "--upstream", controller.url, "--log-publisher", "off", "--retry-delay", "100ms")
	output, err := run(dropping)
	if err == nil || strings.Contains(output, "ok ") {
		t.Errorf("with every request dropped the example ended with %v, printing:\n%s", err, output)
	}
	if posts := controller.posts.Load(); posts < 2 {
		t.Errorf("the controller got %d POSTs: the example did not repeat the call", posts)
	}
}

var (
	// scriptsImportPath is the one definition of the generators' M option, in scripts/go-client.
	scriptsImportPath = regexp.MustCompile(`(?m)^go_package="(M[^"]+)"$`)
	// docsImportPath is an M option as the docs give it to protoc.
	docsImportPath = regexp.MustCompile(`go(?:-grpc)?_opt='(M[^']*)'`)
)

// TestTheDocsGiveTheGeneratorsTheScriptsImportPath: the README and docs/clients.md show the
// protoc command a reader copies, so their M options must be the script's, which the client is
// tested with.
func TestTheDocsGiveTheGeneratorsTheScriptsImportPath(t *testing.T) {
	script, err := os.ReadFile("../../scripts/go-client")
	if err != nil {
		t.Fatal(err)
	}
	defined := scriptsImportPath.FindSubmatch(script)
	if defined == nil {
		t.Fatalf("scripts/go-client defines no go_package=\"M...\" (the pattern is %v)", scriptsImportPath)
	}
	for _, path := range []string{"../../README.md", "../../docs/clients.md"} {
		text, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		options := docsImportPath.FindAllSubmatch(text, -1)
		if len(options) != 2 {
			t.Errorf("%s gives %d M options; its protoc command gives one to each generator, 2", path, len(options))
		}
		for _, option := range options {
			if string(option[1]) != string(defined[1]) {
				t.Errorf("%s gives the generators %q; scripts/go-client gives %q", path, option[1], defined[1])
			}
		}
	}
}
