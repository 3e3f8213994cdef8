package exportguard

import "github.com/lazybase/lazybase/internal/imageio"

// Timeouts bound each phase of one registry request a Remote makes; none of
// them bounds a whole transfer. Its fields, each taking its default when
// zero:
//
//	Connect         a TCP connection attempt, DNS lookup included (30s)
//	TLSHandshake    a TLS handshake (10s)
//	ResponseHeader  the wait for a response's headers (60s)
//	Idle            every wait for the next bytes of a response body (60s)
type Timeouts = imageio.Timeouts

// TimeoutError is the error of a registry request that a Timeouts limit
// cut short. Its Host field names the registry (host:port), Phase the phase
// that stalled ("connect", "TLS handshake", "request body", "response
// headers" or "response body") and Limit the timeout that ran out. It is a
// net.Error whose Timeout method reports true; match it with errors.As.
type TimeoutError = imageio.TimeoutError
