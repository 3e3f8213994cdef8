package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"

	"github.com/containerd/log"
)

type config struct {
	runs         int
	baselineRuns int
	images       []string
	cacheDir     string
	mirror       string
	refimages    bool
	cpuProfile   string
	childDir     string
	childDigest  string
	childJob     string
	childDst     string
	registry     bool
	registryBin  string
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "convbench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("convbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&c.runs, "runs", 3, "lazybase conversions per image (the median is printed)")
	fs.IntVar(&c.baselineRuns, "baseline-runs", 1, "estargz.Build baseline runs per image (the median is printed)")
	images := fs.String("images", "debian,golang", "comma-separated reference images to measure")
	fs.StringVar(&c.cacheDir, "cache", "", "reference image cache directory (default: refimage's)")
	fs.StringVar(&c.mirror, "mirror", "", "Debian mirror for building reference images (default: apt's)")
	fs.BoolVar(&c.refimages, "refimages", false, "only build the reference images into the cache and print where they are")
	fs.BoolVar(&c.registry, "registry", true, "also measure 'lazybase convert' registry to registry (convert/job against an in-process registry)")
	fs.StringVar(&c.registryBin, "registry-bin", "docker-registry", "the distribution registry binary the registry-to-registry figure runs against (looked up in PATH); empty, or not found: go-containerregistry's in-process registry")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of the last lazybase run of each image to FILE.<image>")
	// Hidden: the child process that runs one lazybase conversion.
	fs.StringVar(&c.childDir, "child-convert", "", "")
	fs.StringVar(&c.childDigest, "child-digest", "", "")
	fs.StringVar(&c.childJob, "child-job", "", "")
	fs.StringVar(&c.childDst, "child-dst", "", "")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: convbench [flags]\n\n")
		fs.VisitAll(func(f *flag.Flag) {
			if strings.HasPrefix(f.Name, "child-") {
				return
			}
			def := ""
			if f.DefValue != "" && f.DefValue != "false" {
				def = " (default " + f.DefValue + ")"
			}
			fmt.Fprintf(stderr, "  -%s\n    \t%s%s\n", f.Name, f.Usage, def)
		})
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() != 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.runs < 1 || c.baselineRuns < 1 {
		return nil, fmt.Errorf("-runs and -baseline-runs must be at least 1")
	}
	if c.registryBin != "" {
		if p, err := exec.LookPath(c.registryBin); err == nil {
			c.registryBin = p
		} else {
			fmt.Fprintf(stderr, "convbench: %s not found (%v): measuring registry to registry against the in-process registry\n", c.registryBin, err)
			c.registryBin = ""
		}
	}
	for _, s := range strings.Split(*images, ",") {
		if s = strings.TrimSpace(s); s != "" {
			c.images = append(c.images, s)
		}
	}
	if len(c.images) == 0 && c.childDir == "" && c.childJob == "" {
		return nil, fmt.Errorf("no images to measure")
	}
	return c, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	log.L.Logger.SetOutput(stderr)
	if c.childDir != "" {
		return runChild(ctx, c.childDir, c.childDigest, c.cpuProfile, stdout)
	}
	if c.childJob != "" {
		return runChildJob(ctx, c.childJob, c.childDst, c.cpuProfile, stdout)
	}
	return runBench(ctx, c, stdout, stderr)
}
