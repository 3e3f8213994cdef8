package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/internal/imageio"
)

// addTimeoutFlags registers the registry timeout flags of cmd, which fill
// t; check them with checkTimeoutFlags.
func addTimeoutFlags(cmd *cobra.Command, t *imageio.Timeouts) {
	f := cmd.Flags()
	d := imageio.DefaultTimeouts()
	f.DurationVar(&t.Connect, "connect-timeout", d.Connect, "registry timeout: TCP connect")
	f.DurationVar(&t.TLSHandshake, "tls-timeout", d.TLSHandshake, "registry timeout: TLS handshake")
	f.DurationVar(&t.ResponseHeader, "response-timeout", d.ResponseHeader, "registry timeout: response headers, once a request is sent")
	f.DurationVar(&t.Idle, "idle-timeout", d.Idle, "registry timeout: longest wait for the next bytes of a blob (never the whole transfer)")
}

// checkTimeoutFlags rejects timeouts that are not positive.
func checkTimeoutFlags(t imageio.Timeouts) error {
	for _, f := range []struct {
		flag string
		d    any
		ok   bool
	}{
		{"--connect-timeout", t.Connect, t.Connect > 0},
		{"--tls-timeout", t.TLSHandshake, t.TLSHandshake > 0},
		{"--response-timeout", t.ResponseHeader, t.ResponseHeader > 0},
		{"--idle-timeout", t.Idle, t.Idle > 0},
	} {
		if !f.ok {
			return fmt.Errorf("%s must be positive, got %s", f.flag, f.d)
		}
	}
	return nil
}
