package exportguard

import (
	"context"
	"errors"
	"fmt"
)

// ErrVerify is wrapped by every error about a blob whose bytes do not match
// its descriptor. Such a blob is never committed and not retried.
var ErrVerify = errors.New("blob failed verification")

// ErrDigestMismatch reports bytes whose digest differs from the descriptor's.
var ErrDigestMismatch = fmt.Errorf("digest mismatch: %w", ErrVerify)

// ErrSizeMismatch reports a blob whose size differs from the descriptor's.
var ErrSizeMismatch = fmt.Errorf("size mismatch: %w", ErrVerify)

// ErrClosed is returned by Ensure on a Guard that was closed.
var ErrClosed = errors.New("guard closed")

type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// Permanent marks err as one that retrying cannot fix (a Fetcher returns it
// for a missing blob or a refused credential, for example). Errors that are
// not marked are retried.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err: err}
}

// IsPermanent reports whether err, or an error it wraps, was marked by
// Permanent.
func IsPermanent(err error) bool {
	var p *permanentError
	return errors.As(err, &p)
}

// retryable reports whether another attempt may succeed after err.
func retryable(err error) bool {
	var p *permanentError
	switch {
	case errors.As(err, &p),
		errors.Is(err, ErrVerify),
		errors.Is(err, ErrClosed),
		errors.Is(err, context.Canceled),
		errors.Is(err, context.DeadlineExceeded):
		return false
	}
	return true
}
