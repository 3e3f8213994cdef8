package main

import (
	"context"
	"regexp"
	"strings"
	"testing"
)

// TestDemoSmallPrintsReport drives the verb: the report lists both layers
// with their TOC digests and what was verified. internal/demo's tests check
// the report's values.
func TestDemoSmallPrintsReport(t *testing.T) {
	isolate(t)
	stdout, stderr, err := runCLI(context.Background(), t, "demo", "--small")
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, stderr)
	}
	for _, want := range []string{
		"lazybase demo: registry at http://127.0.0.1:",
		"published 127.0.0.1:",
		"verified: validate.Image passes on the pushed image",
		"ready for lazy pull: 127.0.0.1:",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("no %q in:\n%s", want, stdout)
		}
	}
	if n := strings.Count(stdout, "VerifyTOC ok, VerifyEStargz ok"); n != 2 {
		t.Errorf("%d layers verified, want 2:\n%s", n, stdout)
	}
	if n := len(regexp.MustCompile(`(?m)^[0-9]+\s+sha256:[0-9a-f]{12}\s.*sha256:[0-9a-f]{64}$`).FindAllString(stdout, -1)); n != 2 {
		t.Errorf("%d layer rows with a TOC digest, want 2:\n%s", n, stdout)
	}
}

func TestDemoBadFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--small", "--format", "lz4"}, "--format"},
		{[]string{"--small", "--source", t.TempDir()}, "--small and --source"},
		{[]string{"--max-bytes", "0"}, "--max-bytes must be positive"},
	} {
		_, _, err := runCLI(context.Background(), t, append([]string{"demo"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err %v, want it to name %s", tc.args, err, tc.want)
		}
	}
}
