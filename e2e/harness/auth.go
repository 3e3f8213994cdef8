package harness

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// plainToken is what WithRegistryAuth accepts as user and password, so
// they need no quoting in the credential helper script.
var plainToken = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)

// WithRegistryAuth runs the registry with distribution's htpasswd auth:
// every request needs HTTP basic credentials user:password (a bcrypt
// htpasswd file the harness writes). The shaping proxy passes the
// challenge and the credentials through. Registry.User and
// Registry.Password hold them; daemons and tools get them the way users
// give them (a docker config.json, a credential helper), which the test
// sets up with WithEnv and the daemon's [auth] table.
func WithRegistryAuth(user, password string) Option {
	return func(o *options) error {
		if !plainToken.MatchString(user) || !plainToken.MatchString(password) {
			return fmt.Errorf("registry auth: user and password must match %s", plainToken)
		}
		o.registryUser, o.registryPassword = user, password
		return nil
	}
}

// WithEnv adds environment variables ("KEY=value") to every daemon and
// tool the Stack runs (lazybase, buildctl, ctr, ...), such as
// DOCKER_CONFIG. A "PATH=dir[:dir...]" entry is put in front of the
// harness's own PATH instead of replacing it (a directory holding a
// docker-credential-NAME helper, say).
func WithEnv(kv ...string) Option {
	return func(o *options) error {
		for _, e := range kv {
			if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
				return fmt.Errorf("environment entry %q: want KEY=value", e)
			}
		}
		o.env = append(o.env, kv...)
		return nil
	}
}

// WithLazybaseConfigFunc is WithLazybaseConfig with TOML computed once the
// registry runs, for keys that name its host (auth.credential_helpers,
// registry.mirrors). The harness still sets guard.containerd_address.
func WithLazybaseConfigFunc(f func(r *Registry) string) Option {
	return func(o *options) error {
		o.lazybaseTOMLFunc = f
		return nil
	}
}

// withExtraEnv applies WithEnv's entries to env, which holds the harness's
// PATH.
func (s *Stack) withExtraEnv(env []string) []string {
	for _, kv := range s.opts.env {
		k, v, _ := strings.Cut(kv, "=")
		out := env[:0:0]
		for _, e := range env {
			if strings.HasPrefix(e, k+"=") {
				if k == "PATH" {
					v = v + ":" + strings.TrimPrefix(e, "PATH=")
				}
				continue
			}
			out = append(out, e)
		}
		env = append(out, k+"="+v)
	}
	return env
}

// registryAuthConfig returns the auth section of the registry's config
// (empty without WithRegistryAuth): htpasswd with a bcrypt file it
// writes, or token auth with the token server it starts (closed when the
// test ends).
func (s *Stack) registryAuthConfig() (string, *tokenServer, error) {
	if s.opts.registryUser == "" {
		return "", nil, nil
	}
	if s.opts.registryToken {
		bundle := s.path("registry-token.pem")
		ts, err := newTokenServer(s.opts.registryUser, s.opts.registryPassword, bundle)
		if err != nil {
			return "", nil, err
		}
		s.t.Cleanup(func() { _ = ts.close() })
		return fmt.Sprintf("auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n",
			ts.realm(), tokenService, tokenIssuer, bundle), ts, nil
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(s.opts.registryPassword), bcrypt.MinCost)
	if err != nil {
		return "", nil, fmt.Errorf("registry htpasswd: %w", err)
	}
	path := s.path("registry.htpasswd")
	if err := os.WriteFile(path, []byte(s.opts.registryUser+":"+string(hash)+"\n"), 0o600); err != nil {
		return "", nil, err
	}
	return fmt.Sprintf("auth:\n  htpasswd:\n    realm: lazybase-e2e\n    path: %s\n", path), nil, nil
}

// Hosts returns the registry's two addresses, the shaping proxy's and its
// own: credentials must name both.
func (r *Registry) Hosts() []string { return []string{r.Host(), r.Direct} }

// WriteDockerConfig writes dir/config.json with `auths` entries for both of
// the registry's hosts, user:password base64-encoded as docker login
// stores them.
func (r *Registry) WriteDockerConfig(dir, user, password string) error {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	auths := map[string]any{}
	for _, h := range r.Hosts() {
		auths[h] = map[string]string{"auth": auth}
	}
	return writeDockerConfig(dir, map[string]any{"auths": auths})
}

// WriteCredHelperConfig writes dir/config.json naming the credential
// helper docker-credential-<helper> for both of the registry's hosts
// (`credHelpers`), and no secret.
func (r *Registry) WriteCredHelperConfig(dir, helper string) error {
	helpers := map[string]string{}
	for _, h := range r.Hosts() {
		helpers[h] = helper
	}
	return writeDockerConfig(dir, map[string]any{"credHelpers": helpers})
}

func writeDockerConfig(dir string, cfg map[string]any) error {
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600)
}

// WriteCredentialHelper writes dir/docker-credential-<name>, a credential
// helper (the docker-credential-helpers protocol, `get` only) that answers
// user:password for the registry's hosts and "credentials not found" for
// any other, and appends "get <server>" to dir/<name>.calls on every call
// (never the secret), so a test can tell it was used.
func (r *Registry) WriteCredentialHelper(dir, name, user, password string) error {
	return writeCredentialHelper(r.Hosts(), dir, name, user, password)
}

// writeCredentialHelper is WriteCredentialHelper for the given hosts.
func writeCredentialHelper(hosts []string, dir, name, user, password string) error {
	var cases []string
	for _, h := range hosts {
		cases = append(cases, h, "http://"+h, "https://"+h)
	}
	script := fmt.Sprintf(`#!/bin/sh
# A docker credential helper for the e2e registry (get only).
[ "$1" = get ] || { echo "unsupported action $1" >&2; exit 1; }
read -r server || true
echo "get $server" >> %s
case "$server" in
%s)
	printf '{"ServerURL":"%%s","Username":%s,"Secret":%s}\n' "$server"
	;;
*)
	echo "credentials not found in native keychain"
	exit 1
	;;
esac
`, shellQuote(filepath.Join(dir, name+".calls")), strings.Join(cases, "|"), jsonString(user), jsonString(password))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "docker-credential-"+name), []byte(script), 0o700)
}

func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// LazybaseEnv is Lazybase with extra environment entries for this one run
// ("KEY=value", overriding the Stack's), such as a DOCKER_CONFIG holding
// other credentials.
func (s *Stack) LazybaseEnv(ctx context.Context, extra []string, args ...string) (stdout, stderr string, err error) {
	bin, err := goBuild(ctx, modulePath+"/cmd/lazybase")
	if err != nil {
		return "", "", err
	}
	env := s.env()
	for _, kv := range extra {
		k, _, _ := strings.Cut(kv, "=")
		env = slices.DeleteFunc(env, func(e string) bool { return strings.HasPrefix(e, k+"=") })
		env = append(env, kv)
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), errb.String(), fmt.Errorf("lazybase %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), errb.String(), nil
}

// LogFiles returns the paths of every log the Stack's daemons and
// background commands wrote so far.
func (s *Stack) LogFiles() ([]string, error) {
	return filepath.Glob(filepath.Join(s.logDir(), "*.log"))
}
