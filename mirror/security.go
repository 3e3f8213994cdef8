package mirror

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

// RecordAuth holds where the key that authenticates conversion records
// comes from (the top-level record_key_file and record_key_env keys).
type RecordAuth struct {
	// RecordKeyFile is a file holding the record key. Default: "".
	RecordKeyFile string `toml:"record_key_file"`
	// RecordKeyEnv names an environment variable holding the record key.
	// Default: "".
	RecordKeyEnv string `toml:"record_key_env"`
}

// ServeConfig is the [serve] table: settings of `lazybase mirror serve`.
type ServeConfig struct {
	// TokenFile is a file holding the shared secret notifications carry
	// (see Server). Default: "".
	TokenFile string `toml:"token_file"`
	// TokenEnv names an environment variable holding the shared secret.
	// Default: "".
	TokenEnv string `toml:"token_env"`
	// NoAuth accepts unauthenticated notifications; only with a loopback
	// listen address. Default: false.
	NoAuth bool `toml:"no_auth"`
	// MaxEvents is the most push events one request may name. Default:
	// DefaultMaxEvents.
	MaxEvents int `toml:"max_events"`
	// Queue is the most jobs that may wait. Default: DefaultQueue.
	Queue int `toml:"queue"`
	// QueuePerRepository is the most jobs of one source repository that
	// may wait. Default: DefaultQueuePerRepository.
	QueuePerRepository int `toml:"queue_per_repository"`
	// GracePeriod is how long queued and running jobs may still run after
	// SIGTERM. Default: DefaultGracePeriod.
	GracePeriod string `toml:"grace_period"`
	// StateFile is where unfinished jobs are saved at shutdown and read
	// at start. Default: "" (unfinished jobs are logged, not saved).
	StateFile string `toml:"state_file"`
}

// Defaults of the [serve] table.
const (
	DefaultMaxEvents          = 100
	DefaultQueue              = 256
	DefaultQueuePerRepository = 32
	DefaultGracePeriod        = 30 * time.Second
	// MinSecretLength is the shortest token or record key accepted.
	MinSecretLength = 16
)

func (c *Config) validateSecurity() error {
	if c.RecordKeyFile != "" && c.RecordKeyEnv != "" {
		return errors.New("record_key_file, record_key_env: set one of the two, not both")
	}
	s := &c.Serve
	if s.TokenFile != "" && s.TokenEnv != "" {
		return errors.New("serve.token_file, serve.token_env: set one of the two, not both")
	}
	if s.NoAuth && (s.TokenFile != "" || s.TokenEnv != "") {
		return errors.New("serve.no_auth: set together with a token; choose one")
	}
	for _, p := range []struct {
		key string
		v   *int
		def int
	}{
		{"serve.max_events", &s.MaxEvents, DefaultMaxEvents},
		{"serve.queue", &s.Queue, DefaultQueue},
		{"serve.queue_per_repository", &s.QueuePerRepository, DefaultQueuePerRepository},
	} {
		if *p.v < 0 {
			return fmt.Errorf("%s: must not be negative, got %d", p.key, *p.v)
		}
		if *p.v == 0 {
			*p.v = p.def
		}
	}
	if s.GracePeriod == "" {
		s.GracePeriod = DefaultGracePeriod.String()
	}
	if d, err := time.ParseDuration(s.GracePeriod); err != nil || d < 0 {
		return fmt.Errorf("serve.grace_period: want a duration such as \"30s\", got %q", s.GracePeriod)
	}
	return nil
}

// Grace returns the parsed grace period.
func (s *ServeConfig) Grace() time.Duration {
	d, _ := time.ParseDuration(s.GracePeriod)
	return d
}

// Key returns the record key, or nil when none is configured. A key that
// is configured but cannot be read, or is shorter than MinSecretLength,
// is an error.
func (r *RecordAuth) Key() ([]byte, error) {
	return readSecret("record key", r.RecordKeyFile, r.RecordKeyEnv)
}

// Token returns the shared secret of notifications, or nil when none is
// configured.
func (s *ServeConfig) Token() ([]byte, error) {
	return readSecret("serve token", s.TokenFile, s.TokenEnv)
}

// readSecret reads a secret from a file or an environment variable. The
// secret itself never appears in errors.
func readSecret(what, file, env string) ([]byte, error) {
	var b []byte
	switch {
	case file != "":
		var err error
		if b, err = os.ReadFile(file); err != nil {
			return nil, fmt.Errorf("reading the %s: %w", what, err)
		}
		b = bytes.TrimSpace(b)
		if len(b) < MinSecretLength {
			return nil, fmt.Errorf("the %s in %s is %d bytes long, want at least %d", what, file, len(b), MinSecretLength)
		}
	case env != "":
		b = []byte(strings.TrimSpace(os.Getenv(env)))
		if len(b) < MinSecretLength {
			return nil, fmt.Errorf("the %s in environment variable %s is %d bytes long (unset or empty counts as 0), want at least %d", what, env, len(b), MinSecretLength)
		}
	default:
		return nil, nil
	}
	return b, nil
}

// IsLoopback reports whether a listen address (host:port) only accepts
// connections from this machine: a loopback IP or "localhost". An empty
// host listens on every interface and is not loopback.
func IsLoopback(listen string) bool {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
