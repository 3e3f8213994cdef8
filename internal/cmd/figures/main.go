package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/lazybase/lazybase/internal/benchfig"
)

func main() {
	in := flag.String("in", defaultIn(), "directory holding the benchmarks' NAME.json files ($LAZYBASE_BENCH_OUT)")
	readme := flag.String("readme", "README.md", "markdown file whose figures sections are regenerated")
	check := flag.Bool("check", false, "only report whether the file is up to date; exit 1 if not")
	flag.Parse()
	changed, err := run(*in, *readme, *check)
	if err != nil {
		fmt.Fprintf(os.Stderr, "figures: %v\n", err)
		os.Exit(2)
	}
	for _, name := range changed {
		if *check {
			fmt.Printf("%s: figures %s out of date with %s\n", *readme, name, filepath.Join(*in, name+".json"))
		} else {
			fmt.Printf("%s: figures %s regenerated from %s\n", *readme, name, filepath.Join(*in, name+".json"))
		}
	}
	if *check && len(changed) > 0 {
		os.Exit(1)
	}
}

// defaultIn is $LAZYBASE_BENCH_OUT, else bench/ under $LAZYBASE_CACHE,
// else .cache/bench: where the e2e benchmarks write by default.
func defaultIn() string {
	if d := os.Getenv("LAZYBASE_BENCH_OUT"); d != "" {
		return d
	}
	if c := os.Getenv("LAZYBASE_CACHE"); c != "" {
		return filepath.Join(c, "bench")
	}
	return filepath.Join(".cache", "bench")
}

// run renders every known figures file found in dir into the markdown file
// at path and returns the names whose section changed. With check it does
// not write the file.
func run(dir, path string, check bool) ([]string, error) {
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	names := make([]string, 0, len(benchfig.Renderers))
	for name := range benchfig.Renderers {
		names = append(names, name)
	}
	sort.Strings(names)
	out, found := doc, 0
	var changed []string
	for _, name := range names {
		file := filepath.Join(dir, name+".json")
		data, err := os.ReadFile(file)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", file, err)
		}
		found++
		body, err := benchfig.Renderers[name](data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		next, err := benchfig.Replace(out, name, body)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if !bytes.Equal(next, out) {
			changed = append(changed, name)
		}
		out = next
	}
	if found == 0 {
		return nil, fmt.Errorf("no figures in %s (run the benchmarks first, e.g. make e2e, or set -in)", dir)
	}
	if check || len(changed) == 0 {
		return changed, nil
	}
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	tmp := path + ".figures.tmp"
	if err := os.WriteFile(tmp, out, info.Mode().Perm()); err != nil {
		return nil, fmt.Errorf("writing %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	return changed, nil
}
