package prefetch

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestForPassesListsAndDropsProfilesOfOtherImages(t *testing.T) {
	ctx := context.Background()
	list := &List{Version: ListVersion, Files: []string{"a"}}
	if got := For(ctx, list, "registry.example/any:1", hash(t, digestC)); got != Source(list) {
		t.Errorf("For(list) = %v, want the list", got)
	}
	p := sample() // registry.example/golang:1.22 at imgDgst
	if got := For(ctx, p, "registry.example/golang:1.22", hash(t, imgDgst)); got != Source(p) {
		t.Errorf("For(profile of the image) = %v", got)
	}
	if got := For(ctx, p, "registry.example/golang:1.22", hash(t, digestC)); got != nil {
		t.Errorf("For(profile of another digest) = %v, want nil", got)
	}
}

func TestFindProfile(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	write := func(name string, p *Profile) {
		b, err := p.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	byDigest := sample() // registry.example/golang:1.22 at imgDgst
	byRef := sample()
	byRef.Image, byRef.Digest = "registry.example/python:3", ""
	converted := sample()
	converted.Image, converted.Digest, converted.SourceDigest = "mirror.example/node:20", digestB, digestA
	anonymous := sample()
	anonymous.Image, anonymous.Digest = "", ""
	write(ProfileFileName(byDigest.Image), byDigest)
	write(ProfileFileName(byRef.Image), byRef)
	write(ProfileFileName(converted.Image), converted)
	write("0-anonymous.json", anonymous)
	if err := os.WriteFile(filepath.Join(dir, "1-corrupt.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "2-list.json"), []byte(`{"version":1,"files":["a"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, ref, digest, want string
	}{
		{"by digest, other reference", "registry.example/golang:latest", imgDgst, "registry.example_golang_1.22.json"},
		{"by source digest", "docker.io/library/node:20", digestA, "mirror.example_node_20.json"},
		{"by reference", "registry.example/python:3", digestC, "registry.example_python_3.json"},
		{"reference whose profile has another digest", "registry.example/golang:1.22", digestC, ""},
		{"none", "registry.example/ruby:3", digestC, ""},
		{"reference only", "registry.example/golang:1.22", "", "registry.example_golang_1.22.json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var d v1.Hash
			if tc.digest != "" {
				d = hash(t, tc.digest)
			}
			p, file, err := FindProfile(ctx, dir, tc.ref, d)
			if err != nil {
				t.Fatal(err)
			}
			if filepath.Base(file) != tc.want && !(tc.want == "" && file == "") {
				t.Fatalf("FindProfile = %q, want %q", file, tc.want)
			}
			if (p == nil) != (tc.want == "") {
				t.Fatalf("FindProfile profile %v for file %q", p, file)
			}
		})
	}
	if _, _, err := FindProfile(ctx, filepath.Join(dir, "absent"), "x", v1.Hash{}); err == nil {
		t.Error("FindProfile in a missing directory succeeded")
	}
}
