package containerrun

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Flags are the docker-style settings that shape the container, as a user
// gives them.
type Flags struct {
	// Volumes are bind mounts in docker's short form SRC:DST[:ro|rw].
	Volumes []string
	// Mounts are bind mounts in docker's long form
	// type=bind,src=SRC,dst=DST[,ro|readonly[=BOOL]|rw].
	Mounts []string
	// Env holds KEY=VALUE, or KEY alone for this process's value of KEY.
	Env []string
	// Workdir is the command's working directory (absolute); "" keeps the
	// image's.
	Workdir string
}

// Spec is what Flags resolve to: checked bind mounts, environment and
// working directory.
type Spec struct {
	Mounts  []specs.Mount
	Env     []string
	Workdir string
}

// ParseFlags checks and resolves f. Its errors name the flag and the value
// at fault (--volume, --mount, --env, --workdir).
func ParseFlags(f Flags) (Spec, error) {
	var s Spec
	for _, v := range f.Volumes {
		m, err := ParseVolume(v)
		if err != nil {
			return Spec{}, fmt.Errorf("--volume %q: %w", v, err)
		}
		s.Mounts = append(s.Mounts, m)
	}
	for _, v := range f.Mounts {
		m, err := ParseMount(v)
		if err != nil {
			return Spec{}, fmt.Errorf("--mount %q: %w", v, err)
		}
		s.Mounts = append(s.Mounts, m)
	}
	seen := map[string]bool{}
	for _, m := range s.Mounts {
		if seen[m.Destination] {
			return Spec{}, fmt.Errorf("two bind mounts on %s", m.Destination)
		}
		seen[m.Destination] = true
	}
	if f.Workdir != "" {
		if !filepath.IsAbs(f.Workdir) {
			return Spec{}, fmt.Errorf("--workdir %q: not an absolute path", f.Workdir)
		}
		s.Workdir = filepath.Clean(f.Workdir)
	}
	for _, e := range f.Env {
		kv, err := ParseEnv(e)
		if err != nil {
			return Spec{}, fmt.Errorf("--env %q: %w", e, err)
		}
		s.Env = append(s.Env, kv)
	}
	return s, nil
}

// ParseVolume parses docker's short form SRC:DST[:ro|rw].
func ParseVolume(v string) (specs.Mount, error) {
	parts := strings.Split(v, ":")
	if len(parts) < 2 || len(parts) > 3 {
		return specs.Mount{}, errors.New("want SRC:DST or SRC:DST:ro|rw")
	}
	ro := false
	if len(parts) == 3 {
		switch parts[2] {
		case "ro":
			ro = true
		case "rw":
		default:
			return specs.Mount{}, fmt.Errorf("unknown option %q: want ro or rw", parts[2])
		}
	}
	return bindMount(parts[0], parts[1], ro)
}

// ParseMount parses docker's long form type=bind,src=SRC,dst=DST[,ro].
func ParseMount(v string) (specs.Mount, error) {
	var typ, src, dst string
	ro := false
	for _, field := range strings.Split(v, ",") {
		key, val, hasVal := strings.Cut(field, "=")
		switch key {
		case "type":
			typ = val
		case "src", "source":
			src = val
		case "dst", "destination", "target":
			dst = val
		case "ro", "readonly":
			b, err := parseReadOnly(key, val, hasVal)
			if err != nil {
				return specs.Mount{}, err
			}
			ro = b
		case "rw":
			if hasVal {
				return specs.Mount{}, errors.New("rw takes no value")
			}
			ro = false
		default:
			return specs.Mount{}, fmt.Errorf("unknown field %q: want type, src, dst, ro", key)
		}
		if hasVal && val == "" {
			return specs.Mount{}, fmt.Errorf("%s: empty value", key)
		}
	}
	if typ != "bind" {
		return specs.Mount{}, fmt.Errorf("type %q: only type=bind is supported", typ)
	}
	if src == "" || dst == "" {
		return specs.Mount{}, errors.New("want src=SRC and dst=DST")
	}
	return bindMount(src, dst, ro)
}

// parseReadOnly reads the ro or readonly field: alone it means true.
func parseReadOnly(key, val string, hasVal bool) (bool, error) {
	if !hasVal {
		return true, nil
	}
	b, err := strconv.ParseBool(val)
	if err != nil {
		return false, fmt.Errorf("%s=%s: want true or false", key, val)
	}
	return b, nil
}

// bindMount checks a bind mount's paths: both absolute, the source
// present on this host.
func bindMount(src, dst string, ro bool) (specs.Mount, error) {
	if !filepath.IsAbs(src) {
		return specs.Mount{}, fmt.Errorf("source %q: not an absolute path", src)
	}
	if !filepath.IsAbs(dst) {
		return specs.Mount{}, fmt.Errorf("destination %q: not an absolute path", dst)
	}
	if filepath.Clean(dst) == "/" {
		return specs.Mount{}, errors.New("destination /: cannot replace the container's root")
	}
	if _, err := os.Stat(src); err != nil {
		return specs.Mount{}, fmt.Errorf("source %s: %w", src, err)
	}
	opt := "rw"
	if ro {
		opt = "ro"
	}
	return specs.Mount{
		Type:        "bind",
		Source:      filepath.Clean(src),
		Destination: filepath.Clean(dst),
		Options:     []string{"rbind", opt},
	}, nil
}

// ParseEnv parses KEY=VALUE, or KEY alone for this process's value.
func ParseEnv(e string) (string, error) {
	key, _, hasVal := strings.Cut(e, "=")
	if key == "" {
		return "", errors.New("empty variable name")
	}
	if strings.ContainsAny(key, " \t\n\x00") {
		return "", fmt.Errorf("variable name %q has white space", key)
	}
	if hasVal {
		return e, nil
	}
	val, ok := os.LookupEnv(key)
	if !ok {
		return "", fmt.Errorf("%s is not set here: give KEY=VALUE", key)
	}
	return key + "=" + val, nil
}
