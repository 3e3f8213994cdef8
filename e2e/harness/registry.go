package harness

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/lazybase/lazybase/e2e/shaper"
)

// Registry is the Stack's registry process and the shaping proxy in front of
// it.
type Registry struct {
	// Direct is host:port of the registry itself: pushes made by tests go
	// here and are not counted.
	Direct string
	// Proxy shapes and counts what containerd, the lazy snapshotter and
	// buildkitd fetch.
	Proxy *shaper.Proxy

	// User and Password are the credentials the registry requires
	// (WithRegistryAuth); both empty when it runs without auth.
	User, Password string

	token *tokenServer // WithRegistryTokenAuth
	proc  *process
}

// Host returns host:port of the shaping proxy: image references that the
// daemons pull use it.
func (r *Registry) Host() string { return r.Proxy.Addr() }

// Ref returns an image reference "proxy-host/repo:tag" (or "@digest" when
// tag starts with "sha256:").
func (r *Registry) Ref(repo, tag string) string {
	if len(tag) > 7 && tag[:7] == "sha256:" {
		return r.Host() + "/" + repo + "@" + tag
	}
	return r.Host() + "/" + repo + ":" + tag
}

// DirectRef is Ref on the registry itself.
func (r *Registry) DirectRef(repo, tag string) string {
	if len(tag) > 7 && tag[:7] == "sha256:" {
		return r.Direct + "/" + repo + "@" + tag
	}
	return r.Direct + "/" + repo + ":" + tag
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startRegistry starts the Stack's registry: its process under name
// ("registry", or "registry2" for WithSecondRegistry), storage and config
// under the Stack's directory, behind a shaping proxy. The second registry
// is a plain push target: it runs without auth.
func (s *Stack) startRegistry(ctx context.Context, name string) (*Registry, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	storage := s.path(name)
	if err := os.MkdirAll(storage, 0o700); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, storage, addr)
	second := name != "registry"
	var token *tokenServer
	if !second {
		var auth string
		if auth, token, err = s.registryAuthConfig(); err != nil {
			return nil, err
		}
		cfg += auth
	}
	cfgPath := s.path(name + ".yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	p, err := s.spawn(name, s.bins.dockerRegistry, "serve", cfgPath)
	if err != nil {
		return nil, err
	}
	client := &http.Client{Timeout: time.Second}
	err = waitFor(ctx, p, 30*time.Second, "registry on "+addr, func() error {
		resp, err := client.Get("http://" + addr + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if !second && s.opts.registryUser != "" && resp.StatusCode == http.StatusUnauthorized {
			return nil
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if token != nil {
		// Clients reach the registry through the token server's front.
		token.serveFront(addr)
		addr = token.addr
	}
	proxy, err := shaper.New("http://"+addr, shaper.WithBandwidth(s.opts.bandwidth), shaper.WithRTT(s.opts.rtt))
	if err != nil {
		return nil, err
	}
	if err := proxy.Start(); err != nil {
		return nil, err
	}
	if second {
		return &Registry{Direct: addr, Proxy: proxy, proc: p}, nil
	}
	return &Registry{Direct: addr, Proxy: proxy, User: s.opts.registryUser, Password: s.opts.registryPassword, token: token, proc: p}, nil
}
