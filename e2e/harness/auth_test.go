package harness

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCredentialHelperScript runs the helper WriteCredentialHelper writes
// as the docker credential-helper protocol does: the registry's hosts get
// the credentials, any other host "credentials not found", and the calls
// file names the hosts but never the secret.
func TestCredentialHelperScript(t *testing.T) {
	dir := t.TempDir()
	if err := writeCredentialHelper([]string{"127.0.0.1:5000"}, dir, "t", "user", "pw-123"); err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(dir, "docker-credential-t")
	for _, tc := range []struct {
		server string
		ok     bool
	}{
		{"127.0.0.1:5000", true},
		{"http://127.0.0.1:5000", true},
		{"127.0.0.1:5001", false},
		{"registry.example", false},
	} {
		cmd := exec.Command(helper, "get")
		cmd.Stdin = strings.NewReader(tc.server + "\n")
		out, err := cmd.Output()
		if (err == nil) != tc.ok {
			t.Errorf("%s: err=%v, want ok=%v (output %q)", tc.server, err, tc.ok, out)
			continue
		}
		if !tc.ok {
			if !strings.Contains(string(out), "credentials not found") {
				t.Errorf("%s: output %q, want credentials not found", tc.server, out)
			}
			continue
		}
		var c struct{ ServerURL, Username, Secret string }
		if err := json.Unmarshal(out, &c); err != nil {
			t.Fatalf("%s: %v: %q", tc.server, err, out)
		}
		if c.ServerURL != tc.server || c.Username != "user" || c.Secret != "pw-123" {
			t.Errorf("%s: got %+v", tc.server, c)
		}
	}
	calls, err := os.ReadFile(filepath.Join(dir, "t.calls"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(calls), "get ") != 4 || bytes.Contains(calls, []byte("pw-123")) {
		t.Errorf("calls file:\n%s", calls)
	}
}

// TestWithEnv: PATH entries go in front of the harness's PATH, other keys
// replace the environment's.
func TestWithEnv(t *testing.T) {
	o, err := makeOptions(WithEnv("DOCKER_CONFIG=/x", "PATH=/helpers"))
	if err != nil {
		t.Fatal(err)
	}
	s := &Stack{opts: o}
	env := s.withExtraEnv([]string{"HOME=/root", "DOCKER_CONFIG=/old", "PATH=/bin"})
	want := map[string]string{"HOME": "/root", "DOCKER_CONFIG": "/x", "PATH": "/helpers:/bin"}
	if len(env) != len(want) {
		t.Fatalf("env %v", env)
	}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if want[k] != v {
			t.Errorf("%s=%s, want %s", k, v, want[k])
		}
	}
	if _, err := makeOptions(WithEnv("NOEQUALS")); err == nil {
		t.Error("WithEnv accepted an entry without '='")
	}
	for _, bad := range [][2]string{{"", "pw"}, {"u", ""}, {"u:x", "pw"}, {"u", "it's"}} {
		if _, err := makeOptions(WithRegistryAuth(bad[0], bad[1])); err == nil {
			t.Errorf("WithRegistryAuth(%q, %q) accepted", bad[0], bad[1])
		}
	}
}

// TestTokenServer: wrong credentials get 401; right ones (GET with basic
// auth, POST with a password grant) an ES256 JWT whose x5c certificate
// verifies its signature and whose access claim grants the scope asked.
func TestTokenServer(t *testing.T) {
	ts, err := newTokenServer("u", "pw", filepath.Join(t.TempDir(), "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	defer ts.close()
	srv := httptest.NewServer(http.HandlerFunc(ts.serve))
	defer srv.Close()

	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/token?service=s&scope=repository:ref/debian:pull,push", nil)
	req.SetBasicAuth("u", "wrong")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("wrong password: %s", resp.Status)
	}

	req.SetBasicAuth("u", "pw")
	get, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	post, err := http.PostForm(srv.URL+"/token", map[string][]string{
		"grant_type": {"password"}, "username": {"u"}, "password": {"pw"}, "scope": {"repository:ref/debian:pull,push"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, resp := range map[string]*http.Response{"GET": get, "POST": post} {
		var body struct {
			Token string `json:"access_token"`
		}
		err := json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s, %v", name, resp.Status, err)
		}
		parts := strings.Split(body.Token, ".")
		if len(parts) != 3 {
			t.Fatalf("%s: token %q", name, body.Token)
		}
		var header struct {
			Alg string   `json:"alg"`
			X5c []string `json:"x5c"`
		}
		var claims struct {
			Aud    string            `json:"aud"`
			Access []resourceActions `json:"access"`
		}
		decode(t, parts[0], &header)
		decode(t, parts[1], &claims)
		der, _ := base64.StdEncoding.DecodeString(header.X5c[0])
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
		sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
		pub := cert.PublicKey.(*ecdsa.PublicKey)
		if header.Alg != "ES256" || len(sig) != 64 || !ecdsa.Verify(pub, sum[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
			t.Errorf("%s: signature does not verify (alg %s, %d bytes)", name, header.Alg, len(sig))
		}
		if claims.Aud != tokenService || len(claims.Access) != 1 || claims.Access[0].Name != "ref/debian" || strings.Join(claims.Access[0].Actions, ",") != "pull,push" {
			t.Errorf("%s: claims %+v", name, claims)
		}
	}
	if n := len(ts.tokens()); n != 2 {
		t.Errorf("%d tokens recorded, want 2", n)
	}
}

func decode(t *testing.T, part string, v any) {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(part)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}
