package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
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

var built struct {
	sync.Mutex
	dir  string
	bins map[string]string
}

// goBuild returns a binary of the main package pkg (an import path in this
// module), built once per test process: every Stack of the process runs the
// same build of the code under test.
func goBuild(ctx context.Context, pkg string) (string, error) {
	built.Lock()
	defer built.Unlock()
	if b, ok := built.bins[pkg]; ok {
		return b, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	if built.dir == "" {
		// One directory per test process, under the cache so it survives
		// each Stack's teardown; older ones are replaced as they go stale.
		base := filepath.Join(CacheDir(root), "e2e", "build")
		if err := os.MkdirAll(base, 0o755); err != nil {
			return "", err
		}
		removeStaleBuilds(base)
		if built.dir, err = os.MkdirTemp(base, fmt.Sprintf("pid%d-", os.Getpid())); err != nil {
			return "", err
		}
	}
	goBin := "go"
	if p, err := exec.LookPath("go"); err == nil {
		goBin = p
	}
	out := filepath.Join(built.dir, filepath.Base(pkg))
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	if built.bins == nil {
		built.bins = map[string]string{}
	}
	built.bins[pkg] = out
	return out, nil
}

// Cleanup removes what the harness keeps per test process (the binaries
// goBuild made); call it from TestMain after m.Run.
func Cleanup() {
	built.Lock()
	defer built.Unlock()
	if built.dir != "" {
		os.RemoveAll(built.dir)
		built.dir, built.bins = "", nil
	}
}

// removeStaleBuilds removes build directories of test processes that have
// exited.
func removeStaleBuilds(base string) {
	dirs, _ := filepath.Glob(filepath.Join(base, "pid*-*"))
	for _, d := range dirs {
		name := strings.TrimPrefix(filepath.Base(d), "pid")
		pidStr, _, _ := strings.Cut(name, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || syscall.Kill(pid, 0) == nil {
			continue
		}
		os.RemoveAll(d)
	}
}
