package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/refimage"
)

// targetRegistrySpeedup is issue 16's target for 'lazybase convert'
// registry to registry, verification included, against estargz.Build.
const targetRegistrySpeedup = 8.0

// registryJob measures one registry-to-registry conversion of img: a fresh
// registry (bin, the distribution registry the e2e tests run, or
// go-containerregistry's in-process one when bin is empty) is given the
// source image, then a child process converts it to another repository of
// the same registry with convert/job, as 'lazybase convert SRC DST' does:
// pull, convert, verify, push, tag. Each run has its own registry, so no
// run finds the blobs of an earlier one already there.
func registryJob(ctx context.Context, self, bin string, img *refimage.Image, profile string, stderr io.Writer) (*jobResult, error) {
	host, stop, err := startRegistry(ctx, bin)
	if err != nil {
		return nil, err
	}
	defer stop()
	src := fmt.Sprintf("%s/bench/%s:source", host, img.Kind)
	dst := fmt.Sprintf("%s/bench/%s-estargz:converted", host, img.Kind)
	ref, err := name.ParseReference(src, name.Insecure)
	if err != nil {
		return nil, err
	}
	if err := remote.Write(ref, img.Image, remote.WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("pushing the source image to %s: %w", src, err)
	}
	var out bytes.Buffer
	args := []string{"-child-job", src, "-child-dst", dst}
	if profile != "" {
		args = append(args, "-cpuprofile", profile)
	}
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Stdout = &out
	cmd.Stderr = stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("lazybase convert %s %s (child process): %w", src, dst, err)
	}
	var res jobResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		return nil, fmt.Errorf("lazybase convert: reading child report %q: %w", out.String(), err)
	}
	return &res, nil
}

// reportRegistry prints the registry-to-registry figures beside the
// library's and returns how many targets were missed.
func reportRegistry(w io.Writer, c *config, ms []*measurement) int {
	var have []*measurement
	for _, m := range ms {
		if m.job != nil {
			have = append(have, m)
		}
	}
	if len(have) == 0 {
		return 0
	}
	fmt.Fprintf(w, "\nregistry to registry: 'lazybase convert SRC DST' (convert/job: pull, convert, verify, push, tag) between two repositories of %s, median of %d interleaved run(s), each in a child process with a fresh registry\n", registryName(c.registryBin), c.runs)
	fmt.Fprintf(w, "%-12s | %8s %7s | %8s %7s %7s %9s | %8s %8s\n",
		"image", "base s", "MB/s", "r2r s", "conv s", "push s", "MB/s", "library", "r2r")
	misses := 0
	for _, m := range have {
		j := m.job
		fmt.Fprintf(w, "%-12s | %8.2f %7.1f | %8.2f %7.2f %7.2f %9.1f | %7.2fx %7.2fx\n",
			m.name, m.baseSeconds, mb(m.input)/m.baseSeconds,
			j.Seconds, j.ConvertSeconds, j.WriteSeconds, mb(m.input)/j.Seconds,
			m.baseSeconds/m.lazySeconds, m.baseSeconds/j.Seconds)
	}
	for _, m := range have {
		fmt.Fprintf(w, "  %-12s runs: registry to registry %s s; %d layer(s) streamed to the destination while converted\n", m.name, secs(m.jobRunTimes), m.job.Streamed)
		if len(m.jobDigests) > 1 {
			fmt.Fprintf(w, "  %-12s !!! registry to registry produced %d different digests over %d runs (not deterministic)\n", m.name, len(m.jobDigests), len(m.jobRunTimes))
		}
		if !m.jobDigests[m.lazyDigest] {
			fmt.Fprintf(w, "  %-12s !!! registry to registry pushed %s, the library made %s\n", m.name, m.job.Digest, m.lazyDigest)
			misses++
		}
	}
	fmt.Fprintf(w, "\ntarget (issue 16): 'lazybase convert' registry to registry >= %.0fx the baseline\n", targetRegistrySpeedup)
	for _, m := range have {
		speed := m.baseSeconds / m.job.Seconds
		v := verdict(speed >= targetRegistrySpeedup)
		if v != "PASS" {
			misses++
		}
		fmt.Fprintf(w, "  %-12s registry to registry %6.2fx %-4s\n", m.name, speed, v)
	}
	return misses
}

// startRegistry starts an empty registry and returns its host:port and the
// function that stops it and removes its storage. bin is the distribution
// registry's binary, or empty for go-containerregistry's in-process one.
func startRegistry(ctx context.Context, bin string) (string, func(), error) {
	if bin == "" {
		srv := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
		u, err := url.Parse(srv.URL)
		if err != nil {
			srv.Close()
			return "", nil, err
		}
		return u.Host, srv.Close, nil
	}
	dir, err := os.MkdirTemp("", "convbench-registry-")
	if err != nil {
		return "", nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n",
		filepath.Join(dir, "storage"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	cmd := exec.Command(bin, "serve", cfgPath)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Kill()
		<-exited
		os.RemoveAll(dir)
	}
	client := &http.Client{Timeout: time.Second}
	err = eventually.Wait(ctx, 30*time.Second, func() error {
		select {
		case <-exited:
			return fmt.Errorf("exited: %s", logs.String())
		default:
		}
		resp, err := client.Get("http://" + addr + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("registry %s on %s: %w", bin, addr, err)
	}
	return addr, stop, nil
}

// registryName says which registry the figures were measured against.
func registryName(bin string) string {
	if bin == "" {
		return "go-containerregistry's in-process registry"
	}
	return "the distribution registry (" + bin + ", filesystem storage)"
}
