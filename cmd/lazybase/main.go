// Command lazybase converts base images to eStargz, serves them lazily to
// BuildKit through containerd, and guards image exports.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lazybase:", err)
		os.Exit(1)
	}
}
