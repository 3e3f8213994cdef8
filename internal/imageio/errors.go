package imageio

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// RegistryError is a registry's refusal, classified by HTTP status.
type RegistryError struct {
	// Kind is "unauthorized", "denied", "not found", "registry error",
	// "registry refused" or "TLS certificate verification failed".
	Kind       string
	StatusCode int // 0 when no HTTP status applies
	Err        error
}

func (e *RegistryError) Error() string {
	return fmt.Sprintf("%s: %s", e.Kind, describe(e.Err, e.StatusCode))
}

func (e *RegistryError) Unwrap() error { return e.Err }

// describe returns the registry's own words for a transport error, without
// the request line (which may be long), and the status. Other errors (such
// as both schemes of a ping failing) are described whole.
func describe(err error, code int) string {
	if te, ok := err.(*transport.Error); ok {
		var msgs []string
		for _, d := range te.Errors {
			s := string(d.Code)
			if d.Message != "" {
				s += " " + d.Message
			}
			msgs = append(msgs, s)
		}
		if len(msgs) > 0 {
			return fmt.Sprintf("%s (HTTP %d %s)", strings.Join(msgs, "; "), code, http.StatusText(code))
		}
		return fmt.Sprintf("HTTP %d %s", code, http.StatusText(code))
	}
	return err.Error()
}

// classify turns go-containerregistry transport errors into RegistryErrors;
// other errors are returned as they are.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var cve *tls.CertificateVerificationError
	if errors.As(err, &cve) {
		return &RegistryError{Kind: "TLS certificate verification failed", Err: err}
	}
	var te *transport.Error
	if !errors.As(err, &te) {
		return err
	}
	kind := "registry refused"
	switch {
	case te.StatusCode == http.StatusUnauthorized:
		kind = "unauthorized"
	case te.StatusCode == http.StatusForbidden:
		kind = "denied"
	case te.StatusCode == http.StatusNotFound:
		kind = "not found"
	case te.StatusCode >= 500:
		kind = "registry error"
	}
	return &RegistryError{Kind: kind, StatusCode: te.StatusCode, Err: err}
}

// Kind returns the kind of registry refusal found in err's chain
// ("unauthorized", "denied", "not found", "registry error", "registry
// refused"), or "" when there is none. Use it on errors from reading layers
// of a Source, which reach the caller unclassified.
func Kind(err error) string {
	var re *RegistryError
	if errors.As(err, &re) {
		return re.Kind
	}
	if re, ok := classify(err).(*RegistryError); ok {
		return re.Kind
	}
	return ""
}
