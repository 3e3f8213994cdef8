package lazypull

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/service"
)

// stargzDefaults returns the upstream service configuration as stargz's
// own config loader (containerd-stargz-grpc decoding its TOML file with
// pelletier/go-toml v1) leaves it for a file that sets no key: a field
// whose struct tag carries `default:"…"` holds that value, in nested tables
// too, and every other field its zero value. The upstream code applies no
// other defaults at load time; fields left at zero are given their meaning
// ("use the built-in value") by the filesystem itself.
//
// Starting from these values keeps every field lazybase does not set on
// purpose at stargz's own default: a field missed here once was
// fuse.merge_buffer_size, whose zero made FUSE passthrough fail on every
// empty file with a division by zero.
func stargzDefaults() (service.Config, error) {
	var sc service.Config
	if err := applyDefaultTags(reflect.ValueOf(&sc).Elem(), ""); err != nil {
		return service.Config{}, fmt.Errorf("stargz config defaults: %w", err)
	}
	return sc, nil
}

// durationType is the one named integer type whose default may carry a
// unit suffix, as go-toml v1 allows.
var durationType = reflect.TypeFor[time.Duration]()

// applyDefaultTags sets each field of the struct v that has a `default`
// tag to the tag's value, recursing into struct fields that have none.
// path names v in errors.
func applyDefaultTags(v reflect.Value, path string) error {
	t := v.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name := f.Name
		if path != "" {
			name = path + "." + f.Name
		}
		fv := v.Field(i)
		def, ok := f.Tag.Lookup("default")
		if !ok || def == "" {
			if f.Type.Kind() == reflect.Struct {
				if err := applyDefaultTags(fv, name); err != nil {
					return err
				}
			}
			continue
		}
		if err := setFromTag(fv, def); err != nil {
			return fmt.Errorf("field %s: default %q: %w", name, def, err)
		}
	}
	return nil
}

// setFromTag parses s as a value of v's kind and stores it in v.
func setFromTag(v reflect.Value, s string) error {
	switch v.Kind() {
	case reflect.String:
		v.SetString(s)
	case reflect.Bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return err
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if v.Type() == durationType && strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' }) > 0 {
			d, err := time.ParseDuration(s)
			if err != nil {
				return err
			}
			v.SetInt(int64(d))
			return nil
		}
		n, err := strconv.ParseInt(s, 10, v.Type().Bits())
		if err != nil {
			return err
		}
		v.SetInt(n)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		n, err := strconv.ParseUint(s, 10, v.Type().Bits())
		if err != nil {
			return err
		}
		v.SetUint(n)
	case reflect.Float32, reflect.Float64:
		x, err := strconv.ParseFloat(s, v.Type().Bits())
		if err != nil {
			return err
		}
		v.SetFloat(x)
	default:
		return fmt.Errorf("unsupported kind %s", v.Kind())
	}
	return nil
}
