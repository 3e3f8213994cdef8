package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// Versions of the daemons the harness runs; hack/e2e-deps.sh builds the same.
const (
	ContainerdVersion = "v2.4.2"
	BuildkitVersion   = "v0.34.2"
)

const modulePath = "github.com/lazybase/lazybase"

// RepoRoot returns the root of the lazybase checkout the test runs in.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(b, []byte("module "+modulePath+"\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("module " + modulePath + " not found above the working directory")
		}
		dir = parent
	}
}

// CacheDir returns the project's cache directory: $LAZYBASE_CACHE when set,
// else .cache in the checkout at root.
func CacheDir(root string) string {
	if c := os.Getenv("LAZYBASE_CACHE"); c != "" {
		return c
	}
	return filepath.Join(root, ".cache")
}

// binaries are the absolute paths of every program the harness runs.
type binaries struct {
	dir            string // containerd's dir, first on the daemons' PATH
	containerd     string
	ctr            string
	buildkitd      string
	buildctl       string
	runc           string
	dockerRegistry string
}

var (
	binsOnce sync.Once
	binsVal  *binaries
	binsErr  error
)

// findBinaries locates the cached daemons, running hack/e2e-deps.sh once per
// test process when any is missing.
func findBinaries(ctx context.Context) (*binaries, error) {
	binsOnce.Do(func() { binsVal, binsErr = locate(ctx) })
	return binsVal, binsErr
}

func locate(ctx context.Context) (*binaries, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	binDir := os.Getenv("LAZYBASE_E2E_BIN")
	if binDir == "" {
		binDir = filepath.Join(CacheDir(root), "e2e", "bin")
	}
	cdir := filepath.Join(binDir, "containerd-"+ContainerdVersion)
	bdir := filepath.Join(binDir, "buildkit-"+BuildkitVersion)
	b := &binaries{
		dir:        cdir,
		containerd: filepath.Join(cdir, "containerd"),
		ctr:        filepath.Join(cdir, "ctr"),
		buildkitd:  filepath.Join(bdir, "buildkitd"),
		buildctl:   filepath.Join(bdir, "buildctl"),
	}
	check := func() error {
		for _, p := range []string{b.containerd, b.ctr, filepath.Join(cdir, "containerd-shim-runc-v2"), b.buildkitd, b.buildctl} {
			if _, err := os.Stat(p); err != nil {
				return err
			}
		}
		var err error
		if b.runc, err = exec.LookPath("runc"); err != nil {
			return err
		}
		if b.dockerRegistry, err = exec.LookPath("docker-registry"); err != nil {
			return err
		}
		return nil
	}
	if check() == nil {
		return b, nil
	}
	script := filepath.Join(root, "hack", "e2e-deps.sh")
	cmd := exec.CommandContext(ctx, "bash", script)
	cmd.Env = append(os.Environ(), "LAZYBASE_E2E_BIN="+binDir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", script, err, lastLines(string(out), 30))
	}
	if err := check(); err != nil {
		return nil, fmt.Errorf("after %s: %w", script, err)
	}
	return b, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// goBuild builds the main package pkg (an import path in this module) into
// out.
func goBuild(ctx context.Context, pkg, out string) error {
	root, err := RepoRoot()
	if err != nil {
		return err
	}
	goBin := "go"
	if p, err := exec.LookPath("go"); err == nil {
		goBin = p
	}
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}
