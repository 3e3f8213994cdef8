package imageio

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// RegistryError is a registry's refusal, classified by HTTP status.
type RegistryError struct {
	// Kind is "unauthorized", "denied", "not found", "registry error" or
	// "registry refused".
	Kind       string
	StatusCode int
	Err        error
}

func (e *RegistryError) Error() string {
	return fmt.Sprintf("%s: %s", e.Kind, describe(e.Err, e.StatusCode))
}

func (e *RegistryError) Unwrap() error { return e.Err }

// describe returns the registry's own words for a transport error, without
// the request line (which may be long), and the status.
func describe(err error, code int) string {
	var te *transport.Error
	if errors.As(err, &te) {
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
	var te *transport.Error
	if errors.As(err, &te) {
		return classify(te).(*RegistryError).Kind
	}
	return ""
}
