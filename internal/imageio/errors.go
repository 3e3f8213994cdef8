package imageio

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Kinds of registry refusal. A RegistryError matches its kind with
// errors.Is: errors.Is(err, ErrNotFound) tells a missing manifest or blob
// from every other failure.
var (
	// ErrUnauthorized is HTTP 401: no or wrong credentials.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrDenied is HTTP 403: the credentials do not grant the access.
	ErrDenied = errors.New("denied")
	// ErrNotFound is HTTP 404: no such repository, manifest or blob.
	ErrNotFound = errors.New("not found")
	// ErrServer is an HTTP 5xx answer.
	ErrServer = errors.New("registry error")
	// ErrRefused is any other HTTP error status.
	ErrRefused = errors.New("registry refused")
	// ErrCertificate is a TLS certificate the client could not verify.
	ErrCertificate = errors.New("TLS certificate verification failed")
)

// RegistryError is a registry's refusal, classified by HTTP status.
type RegistryError struct {
	// Kind is one of ErrUnauthorized, ErrDenied, ErrNotFound, ErrServer,
	// ErrRefused and ErrCertificate; errors.Is matches it.
	Kind       error
	StatusCode int // 0 when no HTTP status applies
	Err        error
}

func (e *RegistryError) Error() string {
	return fmt.Sprintf("%s: %s", e.Kind, describe(e.Err, e.StatusCode))
}

// Unwrap returns the kind and the underlying error, so that errors.Is
// matches both.
func (e *RegistryError) Unwrap() []error { return []error{e.Kind, e.Err} }

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
		return &RegistryError{Kind: ErrCertificate, Err: err}
	}
	var te *transport.Error
	if !errors.As(err, &te) {
		return err
	}
	kind := ErrRefused
	switch {
	case te.StatusCode == http.StatusUnauthorized:
		kind = ErrUnauthorized
	case te.StatusCode == http.StatusForbidden:
		kind = ErrDenied
	case te.StatusCode == http.StatusNotFound:
		kind = ErrNotFound
	case te.StatusCode >= 500:
		kind = ErrServer
	}
	return &RegistryError{Kind: kind, StatusCode: te.StatusCode, Err: err}
}

// Classify returns err with a registry refusal in its chain classified:
// err itself when it already holds a RegistryError or no refusal at all,
// else a RegistryError wrapping err. Use it on errors from reading layers
// of a Source, which reach the caller unclassified, before matching them
// with errors.Is(err, ErrNotFound) and the like.
func Classify(err error) error {
	var re *RegistryError
	if errors.As(err, &re) {
		return err
	}
	return classify(err)
}
