package harness

import (
	"fmt"
	"os"
	"path/filepath"
)

// MirrorForm is how WithRegistryMirror tells the lazybase daemon about the
// mirror: the two forms of its [registry] section.
type MirrorForm string

const (
	// MirrorsTable is a [registry.mirrors] entry for the mirrored host.
	MirrorsTable MirrorForm = "registry.mirrors"
	// HostsToml is registry.config_path naming a containerd hosts.toml
	// directory (server and a [host."…"] entry with pull and resolve
	// capabilities).
	HostsToml MirrorForm = "hosts.toml"
)

// mirrorOpt is a WithRegistryMirror.
type mirrorOpt struct {
	host string
	form MirrorForm
}

// WithRegistryMirror makes the Stack's registry (its shaping proxy, so that
// transfers are counted) the mirror of host, which need not resolve:
// buildkitd's resolver ([registry."host"] mirrors), containerd's transfer
// service (config_path, a hosts.toml directory) and the lazybase daemon
// ([registry] in the given form, merged into its configuration) all read
// host's images from it. Images are pushed to the registry under their
// repository names; tests name them host/repo:tag.
func WithRegistryMirror(host string, form MirrorForm) Option {
	return func(o *options) error {
		switch form {
		case MirrorsTable, HostsToml:
		default:
			return fmt.Errorf("registry mirror form %q: want %q or %q", form, MirrorsTable, HostsToml)
		}
		if host == "" {
			return fmt.Errorf("registry mirror: empty host")
		}
		o.mirror = &mirrorOpt{host: host, form: form}
		return nil
	}
}

// HostsDir returns the containerd hosts.toml directory (config_path) the
// Stack writes for WithRegistryMirror; "" without it.
func (s *Stack) HostsDir() string {
	if s.opts.mirror == nil {
		return ""
	}
	return s.path("certs.d")
}

// writeHostsDir writes HostsDir()/HOST/hosts.toml for WithRegistryMirror:
// the mirrored host's server, and the Stack's registry as a mirror with
// pull and resolve capabilities over plain HTTP.
func (s *Stack) writeHostsDir() error {
	m := s.opts.mirror
	if m == nil {
		return nil
	}
	dir := filepath.Join(s.HostsDir(), m.host)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	toml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n",
		"https://"+m.host, "http://"+s.Registry.Host())
	return os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644)
}

// buildkitMirrorTOML is buildkitd's [registry."host"] table for
// WithRegistryMirror; the mirror itself is already reached over HTTP.
func (s *Stack) buildkitMirrorTOML() string {
	m := s.opts.mirror
	if m == nil {
		return ""
	}
	return fmt.Sprintf("[registry.%q]\n  mirrors = [%q]\n", m.host, s.Registry.Host())
}

// containerdMirrorTOML is the transfer service's config_path for
// WithRegistryMirror, to go in its plugin table.
func (s *Stack) containerdMirrorTOML() string {
	if s.opts.mirror == nil {
		return ""
	}
	return fmt.Sprintf("[plugins.\"io.containerd.transfer.v1.local\"]\n  config_path = %q\n\n", s.HostsDir())
}

// lazybaseMirror merges WithRegistryMirror's [registry] section into the
// lazybase daemon's configuration cfg.
func (s *Stack) lazybaseMirror(cfg map[string]any) {
	m := s.opts.mirror
	if m == nil {
		return
	}
	reg, _ := cfg["registry"].(map[string]any)
	if reg == nil {
		reg = map[string]any{}
		cfg["registry"] = reg
	}
	switch m.form {
	case MirrorsTable:
		mirrors, _ := reg["mirrors"].(map[string]any)
		if mirrors == nil {
			mirrors = map[string]any{}
			reg["mirrors"] = mirrors
		}
		mirrors[m.host] = []any{map[string]any{"host": s.Registry.Host()}}
	case HostsToml:
		reg["config_path"] = []any{s.HostsDir()}
	}
}
