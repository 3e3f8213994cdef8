package dockerfile

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"

	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Scratch is the base name of a stage built on nothing.
const Scratch = "scratch"

// Base is the external image the target stage of a Dockerfile is built on.
type Base struct {
	// Target is the stage that is exported: its name, or its index when
	// it has none.
	Target string
	// Image is the normalized image reference (docker.io/library/x:latest
	// for "x"); empty when the chain ends in scratch.
	Image string
	// Platform is the --platform of the FROM that names Image, expanded;
	// empty when that FROM has none.
	Platform string
	// Stages are the stages from the target back to the one whose FROM
	// names Image, by name or index.
	Stages []string
	// Line is the line of the FROM that names Image.
	Line int
}

type options struct {
	target    string
	buildArgs map[string]string
	platform  ocispec.Platform
}

// Option configures ExportBase.
type Option func(*options) error

// WithTarget exports stage target instead of the last stage.
func WithTarget(target string) Option {
	return func(o *options) error {
		o.target = target
		return nil
	}
}

// WithBuildArgs sets build arguments, as `--build-arg K=V` does; later
// calls add to earlier ones.
func WithBuildArgs(args map[string]string) Option {
	return func(o *options) error {
		for k, v := range args {
			if k == "" {
				return errors.New("build argument with an empty name")
			}
			o.buildArgs[k] = v
		}
		return nil
	}
}

// WithPlatform sets the build and target platform that BuildKit's
// predefined arguments (BUILDPLATFORM, TARGETARCH, ...) expand to; the
// default is linux on the running architecture.
func WithPlatform(p string) Option {
	return func(o *options) error {
		pl, err := platforms.Parse(p)
		if err != nil {
			return fmt.Errorf("platform %q: %w", p, err)
		}
		o.platform = platforms.Normalize(pl)
		return nil
	}
}

// ExportBase parses the Dockerfile r (named file in errors) and returns the
// external image its target stage is built on.
func ExportBase(r io.Reader, file string, opts ...Option) (*Base, error) {
	o := options{buildArgs: map[string]string{}, platform: platforms.Normalize(ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH})}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	res, err := parser.Parse(r)
	if err != nil {
		return nil, located(file, err)
	}
	stages, metaArgs, err := instructions.Parse(res.AST, nil)
	if err != nil {
		return nil, located(file, err)
	}
	if len(stages) == 0 {
		return nil, fmt.Errorf("%s: no FROM instruction", file)
	}
	target := len(stages) - 1
	if o.target != "" {
		target = -1
		for i, st := range stages {
			if strings.EqualFold(st.Name, o.target) {
				target = i
				break
			}
		}
		if target < 0 {
			return nil, fmt.Errorf("%s: target stage %q not found", file, o.target)
		}
	}
	lex := shell.NewLex(res.EscapeToken)
	env := metaEnv(o, stageName(stages, target))
	for _, a := range metaArgs {
		for _, kv := range a.Args {
			if v, ok := o.buildArgs[kv.Key]; ok {
				env = setEnv(env, kv.Key, v)
				continue
			}
			if kv.Value == nil {
				continue
			}
			v, err := lex.ProcessWordWithMatches(*kv.Value, shell.EnvsFromSlice(env))
			if err != nil {
				return nil, located(file, parser.WithLocation(err, a.Location()))
			}
			env = setEnv(env, kv.Key, v.Result)
		}
	}
	b := &Base{Target: stageName(stages, target)}
	for i := target; ; {
		st := stages[i]
		b.Stages = append(b.Stages, stageName(stages, i))
		line := 0
		if len(st.Location) > 0 {
			line = st.Location[0].Start.Line
		}
		name, err := lex.ProcessWordWithMatches(st.BaseName, shell.EnvsFromSlice(env))
		if err != nil {
			return nil, fmt.Errorf("%s:%d: FROM %s: %w", file, line, st.BaseName, err)
		}
		if name.Result == "" {
			return nil, fmt.Errorf("%s:%d: FROM %s: base name expands to nothing", file, line, st.BaseName)
		}
		// A name of an earlier stage continues the chain there.
		prev := -1
		for j := 0; j < i; j++ {
			if stages[j].Name != "" && strings.EqualFold(stages[j].Name, name.Result) {
				prev = j
			}
		}
		if prev >= 0 {
			i = prev
			continue
		}
		b.Line = line
		if st.Platform != "" {
			p, err := lex.ProcessWordWithMatches(st.Platform, shell.EnvsFromSlice(env))
			if err != nil {
				return nil, fmt.Errorf("%s:%d: FROM --platform=%s: %w", file, line, st.Platform, err)
			}
			if _, err := platforms.Parse(p.Result); err != nil {
				return nil, fmt.Errorf("%s:%d: FROM --platform=%s: %w", file, line, st.Platform, err)
			}
			b.Platform = p.Result
		}
		if strings.EqualFold(name.Result, Scratch) {
			return b, nil
		}
		ref, err := reference.ParseNormalizedNamed(name.Result)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: FROM %s: %w", file, line, name.Result, err)
		}
		b.Image = reference.TagNameOnly(ref).String()
		return b, nil
	}
}

// stageName names stage i by its name, else its index.
func stageName(stages []instructions.Stage, i int) string {
	if stages[i].Name != "" {
		return stages[i].Name
	}
	return fmt.Sprint(i)
}

// metaEnv holds BuildKit's predefined platform arguments, overridden by
// build arguments of the same name.
func metaEnv(o options, target string) []string {
	p := o.platform
	var env []string
	for _, kv := range [][2]string{
		{"BUILDPLATFORM", platforms.Format(p)},
		{"BUILDOS", p.OS},
		{"BUILDOSVERSION", p.OSVersion},
		{"BUILDARCH", p.Architecture},
		{"BUILDVARIANT", p.Variant},
		{"TARGETPLATFORM", platforms.Format(p)},
		{"TARGETOS", p.OS},
		{"TARGETOSVERSION", p.OSVersion},
		{"TARGETARCH", p.Architecture},
		{"TARGETVARIANT", p.Variant},
		{"TARGETSTAGE", target},
	} {
		v := kv[1]
		if ov, ok := o.buildArgs[kv[0]]; ok {
			v = ov
		}
		env = setEnv(env, kv[0], v)
	}
	return env
}

func setEnv(env []string, k, v string) []string {
	for i, kv := range env {
		if strings.HasPrefix(kv, k+"=") {
			env[i] = k + "=" + v
			return env
		}
	}
	return append(env, k+"="+v)
}

// located prefixes err with file and the first line it names.
func located(file string, err error) error {
	var le *parser.LocationError
	if errors.As(err, &le) && len(le.Locations) > 0 && len(le.Locations[0]) > 0 {
		return fmt.Errorf("%s:%d: %w", file, le.Locations[0][0].Start.Line, errors.Unwrap(le))
	}
	return fmt.Errorf("%s: %w", file, err)
}
