package dockerfile

import (
	"fmt"
	"os"
	"strings"
)

// WithBuildArgList sets build arguments from "KEY=VALUE" strings, as
// `docker build --build-arg` takes them: "KEY" alone takes the value
// lookupEnv gives it (os.LookupEnv for the environment's) and is left out
// when it has none.
func WithBuildArgList(kvs []string, lookupEnv func(string) (string, bool)) Option {
	return func(o *options) error {
		for _, kv := range kvs {
			k, v, ok := strings.Cut(kv, "=")
			if k == "" {
				return fmt.Errorf("build argument %q: empty name", kv)
			}
			if !ok {
				var set bool
				if v, set = lookupEnv(k); !set {
					continue
				}
			}
			o.buildArgs[k] = v
		}
		return nil
	}
}

// ExportBaseFile is ExportBase of the Dockerfile at path.
func ExportBaseFile(path string, opts ...Option) (*Base, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ExportBase(f, path, opts...)
}
