package tools

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

// TestBuilderDockerfile parses deploy/builder/Dockerfile with BuildKit's
// Dockerfile parser and checks what the e2e test cannot build offline: the
// default (last) stage is "release"; "release" and "local" both take the
// entrypoint and configuration from the stage "files" and use it as their
// entrypoint; every file a stage copies from the build context (the
// repository root) exists, bin/ aside, which only the local target reads.
func TestBuilderDockerfile(t *testing.T) {
	path := filepath.Join(deployDir, "builder", "Dockerfile")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := parser.Parse(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	stages, _, err := instructions.Parse(res.AST, nil)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	byName := map[string]instructions.Stage{}
	for _, s := range stages {
		byName[s.Name] = s
	}
	if last := stages[len(stages)-1].Name; last != "release" {
		t.Errorf("default (last) stage is %q, want release", last)
	}
	repo := filepath.Join(deployDir, "..")
	for _, s := range stages {
		for _, c := range s.Commands {
			cp, ok := c.(*instructions.CopyCommand)
			if !ok || cp.From != "" {
				continue
			}
			for _, src := range cp.SourcePaths {
				if src == "." || strings.HasPrefix(src, "bin/") {
					continue
				}
				if _, err := os.Stat(filepath.Join(repo, src)); err != nil {
					t.Errorf("stage %s copies %s: %v", s.Name, src, err)
				}
			}
		}
	}
	files, ok := byName["files"]
	if !ok {
		t.Fatal("no stage files")
	}
	var entrypoint string
	for _, c := range files.Commands {
		if cp, ok := c.(*instructions.CopyCommand); ok && slices.Contains(cp.SourcePaths, "deploy/builder/entrypoint.sh") {
			entrypoint = cp.DestPath
		}
	}
	if entrypoint == "" {
		t.Fatal("stage files does not copy deploy/builder/entrypoint.sh")
	}
	for _, name := range []string{"release", "local"} {
		s, ok := byName[name]
		if !ok {
			t.Errorf("no stage %s", name)
			continue
		}
		fromFiles, ep := false, ""
		for _, c := range s.Commands {
			switch c := c.(type) {
			case *instructions.CopyCommand:
				if c.From == "files" {
					fromFiles = true
				}
			case *instructions.EntrypointCommand:
				ep = strings.Join(c.CmdLine, " ")
			}
		}
		if !fromFiles {
			t.Errorf("stage %s does not copy the stage files", name)
		}
		if ep != entrypoint {
			t.Errorf("stage %s entrypoint %q, want %q", name, ep, entrypoint)
		}
	}
}
