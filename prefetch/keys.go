package prefetch

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// shape is the set of exact keys of a JSON object (obj) or the shape of the
// elements of an array (elem); nil accepts anything.
type shape struct {
	obj  map[string]*shape
	elem *shape
}

var profileShape = &shape{obj: map[string]*shape{
	"version": nil, "kind": nil, "image": nil, "digest": nil, "sourceDigest": nil, "lastRecord": nil,
	"rules": {obj: map[string]*shape{"include": nil, "exclude": nil, "minCount": nil, "layerBytes": nil, "imageBytes": nil}},
	"layers": {elem: &shape{obj: map[string]*shape{
		"digest": nil, "diffID": nil, "sourceDigest": nil, "size": nil, "runs": nil,
		"files": {elem: &shape{obj: map[string]*shape{"path": nil, "size": nil, "count": nil, "rankSum": nil}}},
	}}},
}}

// checkKeys reports object keys that encoding/json would accept but a strict
// reader should not: keys spelt in another case than the format's, and keys
// given twice.
func checkKeys(b []byte, sh *shape) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	return walkKeys(dec, sh, "")
}

func walkKeys(dec *json.Decoder, sh *shape, at string) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return nil
	}
	switch d {
	case '{':
		seen := map[string]bool{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return err
			}
			k, _ := kt.(string)
			var sub *shape
			if sh != nil && sh.obj != nil {
				if seen[k] {
					return fmt.Errorf("%s: key %q given twice", where(at), k)
				}
				seen[k] = true
				s, ok := sh.obj[k]
				if !ok {
					return fmt.Errorf("%s: unknown key %q (keys are case-sensitive)", where(at), k)
				}
				sub = s
			}
			if err := walkKeys(dec, sub, at+"."+k); err != nil {
				return err
			}
		}
	case '[':
		var sub *shape
		if sh != nil {
			sub = sh.elem
		}
		for i := 0; dec.More(); i++ {
			if err := walkKeys(dec, sub, fmt.Sprintf("%s[%d]", at, i)); err != nil {
				return err
			}
		}
	}
	_, err = dec.Token() // the closing delimiter
	return err
}

func where(at string) string {
	if at == "" {
		return "top level"
	}
	return at[1:]
}
