package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/lazybase/lazybase/exportguard"
)

// waitGuard runs the export guard's barrier for req on the daemon's status
// socket at path, printing each layer's state changes and a summary to w.
func waitGuard(ctx context.Context, w io.Writer, path string, req exportguard.BarrierRequest) error {
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		// The daemon gives up first and says on what; this deadline is
		// for a daemon that does not answer.
		ctx, cancel = context.WithTimeout(ctx, req.Timeout+10*time.Second)
		defer cancel()
	}
	start := time.Now()
	p := &guardProgress{w: w, start: start}
	layers, err := exportguard.RequestBarrier(ctx, path, req, p.layer)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && req.Timeout > 0 {
			return fmt.Errorf("no answer from the daemon on %s within --timeout %s", path, req.Timeout)
		}
		return err
	}
	var total int64
	for _, l := range layers {
		if l.Size > 0 {
			total += l.Size
		}
	}
	fmt.Fprintf(w, "guarded %d layers (%s) of %s in namespace %s in %s\n",
		len(layers), sizeOrUnknown(total), strings.Join(req.Images, ", "), req.Namespace, time.Since(start).Round(time.Millisecond))
	return nil
}

// guardProgress prints each layer's state changes.
type guardProgress struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
}

func (p *guardProgress) layer(l exportguard.LayerStatus) {
	p.mu.Lock()
	defer p.mu.Unlock()
	size := ""
	if l.Size >= 0 {
		size = " (" + sizeOrUnknown(l.Size) + ")"
	}
	msg := ""
	if l.Error != "" {
		msg = ": " + l.Error
	}
	fmt.Fprintf(p.w, "%6.1fs %s %s%s %s%s\n", time.Since(p.start).Seconds(), l.Image, layerShort(l.Layer), size, l.State, msg)
}

// statusSocketPath finds the daemon's status socket as the snapshotter
// status verb does: --status-socket, else the config's status_socket, else
// the snapshots socket (--socket, or the config's) with ".status".
func statusSocketPath(configPath, socket, statusSocket string) (string, error) {
	if statusSocket != "" {
		return statusSocket, nil
	}
	cfg, err := loadDaemonConfig(configPath)
	if err != nil {
		return "", err
	}
	if socket != "" {
		cfg.Socket = absPath(socket)
	}
	return cfg.StatusSocketPath(), nil
}
