package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve the snapshots API on")
	root := flag.String("root", "", "snapshotter root directory")
	configPath := flag.String("config", "", "service config (TOML); defaults when empty")
	level := flag.String("log-level", "info", "log level")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := log.SetLevel(*level); err != nil {
		fmt.Fprintln(os.Stderr, "stargzd:", err)
		os.Exit(2)
	}
	if err := run(ctx, *address, *root, *configPath); err != nil {
		log.G(ctx).WithError(err).Error("stargzd failed")
		os.Exit(1)
	}
}

func run(ctx context.Context, address, root, configPath string) error {
	if address == "" || root == "" {
		return errors.New("-address and -root are required")
	}
	var cfg service.Config
	if configPath != "" {
		b, err := os.ReadFile(configPath)
		if err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
		if err := toml.Unmarshal(b, &cfg); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("root %s: %w", root, err)
	}
	sn, err := service.NewStargzSnapshotterService(ctx, root, &cfg)
	if err != nil {
		return fmt.Errorf("stargz service at %s: %w", root, err)
	}
	defer func() {
		// Close unmounts every snapshot the service mounted.
		if err := sn.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing snapshotter")
		}
	}()

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return fmt.Errorf("socket dir %s: %w", filepath.Dir(address), err)
	}
	// A socket left by a previous run would make Listen fail.
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stale socket %s: %w", address, err)
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listen %s: %w", address, err)
	}
	if err := os.Chmod(address, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("socket %s: %w", address, err)
	}

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	log.G(ctx).WithField("address", address).Info("serving stargz snapshotter")

	select {
	case <-ctx.Done():
		log.G(ctx).Info("stopping")
		srv.GracefulStop()
		return nil
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", address, err)
	}
}
