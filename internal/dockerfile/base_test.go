package dockerfile

import (
	"reflect"
	"strings"
	"testing"
)

func TestExportBase(t *testing.T) {
	for _, tc := range []struct {
		name       string
		dockerfile string
		opts       []Option
		want       Base
	}{{
		name:       "single stage",
		dockerfile: "FROM debian:bookworm\nRUN true\n",
		want:       Base{Target: "0", Image: "docker.io/library/debian:bookworm", Stages: []string{"0"}, Line: 1},
	}, {
		name: "multi-stage: the last stage is exported",
		dockerfile: `FROM 127.0.0.1:5000/ref/golang:estargz AS build
RUN go build -o /out/hello .

FROM 127.0.0.1:5000/ref/debian:estargz
COPY --from=build /out/hello /hello
`,
		want: Base{Target: "1", Image: "127.0.0.1:5000/ref/debian:estargz", Stages: []string{"1"}, Line: 4},
	}, {
		name: "named stages chain to the external image",
		dockerfile: `FROM golang:1.26 AS build
FROM debian AS base
RUN apt-get update
FROM base AS runtime
COPY --from=build /x /x
FROM runtime
`,
		want: Base{Target: "3", Image: "docker.io/library/debian:latest", Stages: []string{"3", "runtime", "base"}, Line: 2},
	}, {
		name: "stage names are case-insensitive",
		dockerfile: `FROM alpine:3 AS Base
FROM BASE
`,
		want: Base{Target: "1", Image: "docker.io/library/alpine:3", Stages: []string{"1", "base"}, Line: 1},
	}, {
		name: "target selects the stage",
		dockerfile: `FROM golang:1.26 AS build
FROM debian AS final
`,
		opts: []Option{WithTarget("build")},
		want: Base{Target: "build", Image: "docker.io/library/golang:1.26", Stages: []string{"build"}, Line: 1},
	}, {
		name: "ARG before FROM with its default",
		dockerfile: `ARG REGISTRY=127.0.0.1:5000
ARG TAG=estargz
FROM ${REGISTRY}/ref/debian:$TAG
`,
		want: Base{Target: "0", Image: "127.0.0.1:5000/ref/debian:estargz", Stages: []string{"0"}, Line: 3},
	}, {
		name: "build arguments override ARG defaults, defaults may use other ARGs",
		dockerfile: `ARG REGISTRY=r.example
ARG IMAGE=${REGISTRY}/base
ARG TAG=1
FROM ${IMAGE}:${TAG} AS final
`,
		opts: []Option{WithBuildArgs(map[string]string{"REGISTRY": "127.0.0.1:5000", "TAG": "2"})},
		want: Base{Target: "final", Image: "127.0.0.1:5000/base:2", Stages: []string{"final"}, Line: 4},
	}, {
		name: "a build argument not declared before FROM does not reach it",
		dockerfile: `ARG TAG=1
FROM debian:${TAG}${EXTRA}
`,
		opts: []Option{WithBuildArgs(map[string]string{"EXTRA": "-slim"})},
		want: Base{Target: "0", Image: "docker.io/library/debian:1", Stages: []string{"0"}, Line: 2},
	}, {
		name: "ARG selects a stage by name",
		dockerfile: `ARG VARIANT=slim
FROM debian:bookworm AS full
FROM debian:bookworm-slim AS slim
FROM ${VARIANT}
`,
		opts: []Option{WithBuildArgs(map[string]string{"VARIANT": "full"})},
		want: Base{Target: "2", Image: "docker.io/library/debian:bookworm", Stages: []string{"2", "full"}, Line: 2},
	}, {
		name: "scratch is no image",
		dockerfile: `FROM golang AS build
FROM scratch
COPY --from=build /x /x
`,
		want: Base{Target: "1", Stages: []string{"1"}, Line: 2},
	}, {
		name: "--platform with a predefined argument",
		dockerfile: `FROM --platform=$BUILDPLATFORM golang AS build
FROM --platform=linux/arm64 debian AS final
FROM final
`,
		opts: []Option{WithPlatform("linux/amd64")},
		want: Base{Target: "2", Image: "docker.io/library/debian:latest", Platform: "linux/arm64", Stages: []string{"2", "final"}, Line: 2},
	}, {
		name:       "--platform from TARGETPLATFORM",
		dockerfile: "FROM --platform=$TARGETPLATFORM debian@sha256:" + strings.Repeat("a", 64) + "\n",
		opts:       []Option{WithPlatform("linux/arm64/v8")},
		want:       Base{Target: "0", Image: "docker.io/library/debian@sha256:" + strings.Repeat("a", 64), Platform: "linux/arm64", Stages: []string{"0"}, Line: 1},
	}, {
		name: "a stage name used before the stage is an image",
		dockerfile: `FROM later
FROM debian AS later
`,
		opts: []Option{WithTarget("0")},
	}, {
		name:       "escape directive and line continuation",
		dockerfile: "# escape=`\nFROM `\n  debian:12\n",
		want:       Base{Target: "0", Image: "docker.io/library/debian:12", Stages: []string{"0"}, Line: 2},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ExportBase(strings.NewReader(tc.dockerfile), "Dockerfile", tc.opts...)
			if tc.want.Target == "" {
				// WithTarget("0"): stage 0 has no name, so it is not found.
				if err == nil || !strings.Contains(err.Error(), `target stage "0" not found`) {
					t.Fatalf("got %+v, %v", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*got, tc.want) {
				t.Errorf("got  %+v\nwant %+v", *got, tc.want)
			}
		})
	}
}

func TestExportBaseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, dockerfile string
		opts             []Option
		want             string
	}{
		{"unknown instruction", "FROM debian\nFORM x\n", nil, "ci/Dockerfile.bad:2: unknown instruction: FORM"},
		{"FROM without an image", "FROM debian\nRUN true\nFROM\n", nil, "ci/Dockerfile.bad:3: "},
		{"no instructions", "# just a comment\n", nil, "ci/Dockerfile.bad:1: file with no instructions"},
		{"instruction before FROM", "RUN true\nFROM debian\n", nil, "ci/Dockerfile.bad:1: "},
		{"base expands to nothing", "ARG BASE\nFROM $BASE\n", nil, "ci/Dockerfile.bad:2: FROM $BASE: base name expands to nothing"},
		{"bad reference", "FROM Debian:Bad:Ref\n", nil, "ci/Dockerfile.bad:1: FROM Debian:Bad:Ref: "},
		{"required ARG", "ARG TAG\nFROM debian:${TAG:?required}\n", nil, "ci/Dockerfile.bad:2: FROM debian:${TAG:?required}: "},
		{"bad platform", "FROM --platform=linux/nope/x/y debian\n", nil, "ci/Dockerfile.bad:1: FROM --platform=linux/nope/x/y: "},
		{"missing target", "FROM debian AS a\n", []Option{WithTarget("b")}, `ci/Dockerfile.bad: target stage "b" not found`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ExportBase(strings.NewReader(tc.dockerfile), "ci/Dockerfile.bad", tc.opts...)
			if err == nil {
				t.Fatalf("got %+v, want an error", got)
			}
			t.Log(err)
			if !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("error %q, want it to start with %q", err, tc.want)
			}
		})
	}
}

func TestWithPlatformRejectsGarbage(t *testing.T) {
	if _, err := ExportBase(strings.NewReader("FROM x\n"), "Dockerfile", WithPlatform("not a platform!")); err == nil {
		t.Fatal("no error")
	}
}

func TestWithBuildArgList(t *testing.T) {
	env := map[string]string{"FROM_ENV": "env-value"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	df := "ARG A=a0\nARG B=b0\nARG FROM_ENV=e0\nARG UNSET=u0\nFROM r.example/${A}/${B}/${FROM_ENV}:${UNSET}\n"
	base, err := ExportBase(strings.NewReader(df), "Dockerfile", WithBuildArgList([]string{"A=x", "B=b1", "FROM_ENV", "UNSET"}, lookup))
	if err != nil {
		t.Fatal(err)
	}
	// A=x and B=b1 set, FROM_ENV takes the
	// environment's value, UNSET is not in it and keeps its default.
	if want := "r.example/x/b1/env-value:u0"; base.Image != want {
		t.Errorf("image %q, want %q", base.Image, want)
	}
	for _, bad := range [][]string{{"=v"}, {""}} {
		if _, err := ExportBase(strings.NewReader(df), "Dockerfile", WithBuildArgList(bad, lookup)); err == nil || !strings.Contains(err.Error(), "empty name") {
			t.Errorf("%q: got %v, want an empty name error", bad, err)
		}
	}
}

func TestExportBaseFileNamesMissingFile(t *testing.T) {
	if _, err := ExportBaseFile("/nonexistent/Dockerfile"); err == nil || !strings.Contains(err.Error(), "/nonexistent/Dockerfile") {
		t.Fatalf("got %v, want the path named", err)
	}
}
