package harness

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"
)

// Names the token server signs with and the registry checks.
const (
	tokenIssuer  = "lazybase-e2e-token"
	tokenService = "lazybase-e2e"
)

// WithRegistryTokenAuth runs the registry with distribution's token auth:
// requests need a bearer token from a token server the harness runs in the
// test process. The token server answers /token on the registry's own
// host:port (a front in the test process passes everything else to the
// registry and points the challenge's realm at the host the client asked,
// as registries that serve their own token endpoint do):
// go-containerregistry refuses a realm on another loopback host. It hands
// tokens to clients that present user:password by HTTP basic auth (GET, as
// docker does) or by an OAuth2 password grant (POST, as containerd tries
// first); tokens are ES256 JWTs with the signing certificate in x5c, which
// the registry checks against its rootcertbundle. Registry.Direct is the
// front's address; Registry.Tokens lists what the server issued.
func WithRegistryTokenAuth(user, password string) Option {
	return func(o *options) error {
		if err := WithRegistryAuth(user, password)(o); err != nil {
			return err
		}
		o.registryToken = true
		return nil
	}
}

// tokenServer issues registry bearer tokens.
type tokenServer struct {
	user, password string
	key            *ecdsa.PrivateKey
	certDER        []byte
	srv            *http.Server
	ln             net.Listener
	addr           string // the front's host:port

	mu     sync.Mutex
	issued []string
	denied int
}

// newTokenServer makes a token server's key and writes the certificate
// bundle the registry trusts to bundle; listen starts its front.
func newTokenServer(user, password, bundle string) (*tokenServer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: tokenIssuer},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("token server certificate: %w", err)
	}
	if err := os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("token server listen: %w", err)
	}
	return &tokenServer{user: user, password: password, key: key, certDER: der, ln: ln, addr: ln.Addr().String()}, nil
}

// serveFront serves /token and passes every other request to the registry
// at registry (host:port), rewriting the realm of its bearer challenges
// to /token on the host the client asked for.
func (ts *tokenServer) serveFront(registry string) {
	target := &url.URL{Scheme: "http", Host: registry}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = r.In.Host
		},
		ModifyResponse: func(resp *http.Response) error {
			if c := resp.Header.Get("WWW-Authenticate"); strings.HasPrefix(c, "Bearer ") {
				realm := "http://" + resp.Request.Host + "/token"
				resp.Header.Set("WWW-Authenticate", realmRE.ReplaceAllString(c, `realm="`+realm+`"`))
			}
			return nil
		},
		FlushInterval: -1,
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/token", ts.serve)
	mux.Handle("/", rp)
	ts.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = ts.srv.Serve(ts.ln) }()
}

var realmRE = regexp.MustCompile(`realm="[^"]*"`)

func (ts *tokenServer) realm() string { return "http://" + ts.addr + "/token" }

func (ts *tokenServer) close() error {
	if ts.srv == nil {
		return ts.ln.Close()
	}
	return ts.srv.Close()
}

// tokens returns every token issued so far.
func (ts *tokenServer) tokens() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]string(nil), ts.issued...)
}

func (ts *tokenServer) serve(w http.ResponseWriter, r *http.Request) {
	var user, password string
	var scopes []string
	switch r.Method {
	case http.MethodGet:
		user, password, _ = r.BasicAuth()
		scopes = r.URL.Query()["scope"]
	case http.MethodPost:
		if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "password" {
			http.Error(w, "unsupported grant", http.StatusBadRequest)
			return
		}
		user, password = r.PostForm.Get("username"), r.PostForm.Get("password")
		scopes = strings.Fields(r.PostForm.Get("scope"))
	default:
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if user != ts.user || password != ts.password {
		ts.mu.Lock()
		ts.denied++
		ts.mu.Unlock()
		w.Header().Set("WWW-Authenticate", `Basic realm="lazybase-e2e-token"`)
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"wrong credentials"}]}`, http.StatusUnauthorized)
		return
	}
	token, err := ts.sign(user, scopes)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	ts.mu.Lock()
	ts.issued = append(ts.issued, token)
	ts.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"token": token, "access_token": token, "expires_in": 600,
		"issued_at": time.Now().UTC().Format(time.RFC3339),
	})
}

// resourceActions is one entry of a token's "access" claim.
type resourceActions struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// sign returns an ES256 JWT granting every scope asked for
// ("repository:NAME:pull,push").
func (ts *tokenServer) sign(subject string, scopes []string) (string, error) {
	access := []resourceActions{}
	for _, sc := range scopes {
		for _, s := range strings.Fields(sc) {
			i, j := strings.Index(s, ":"), strings.LastIndex(s, ":")
			if i < 0 || j <= i {
				continue
			}
			access = append(access, resourceActions{Type: s[:i], Name: s[i+1 : j], Actions: strings.Split(s[j+1:], ",")})
		}
	}
	now := time.Now()
	jti := make([]byte, 16)
	if _, err := rand.Read(jti); err != nil {
		return "", err
	}
	header := map[string]any{"typ": "JWT", "alg": "ES256", "x5c": []string{base64.StdEncoding.EncodeToString(ts.certDER)}}
	claims := map[string]any{
		"iss": tokenIssuer, "sub": subject, "aud": tokenService,
		"exp": now.Add(10 * time.Minute).Unix(), "nbf": now.Add(-time.Minute).Unix(), "iat": now.Unix(),
		"jti": base64.RawURLEncoding.EncodeToString(jti), "access": access,
	}
	enc := func(v any) (string, error) {
		b, err := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b), err
	}
	h, err := enc(header)
	if err != nil {
		return "", err
	}
	c, err := enc(claims)
	if err != nil {
		return "", err
	}
	signed := h + "." + c
	sum := sha256.Sum256([]byte(signed))
	r, s, err := ecdsa.Sign(rand.Reader, ts.key, sum[:])
	if err != nil {
		return "", err
	}
	// JWS ES256: r and s, 32 bytes each, big-endian.
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// Tokens returns every bearer token the token server issued
// (WithRegistryTokenAuth; nil otherwise): secrets no log may hold.
func (r *Registry) Tokens() []string {
	if r.token == nil {
		return nil
	}
	return r.token.tokens()
}

// TokenRealm returns the token server's URL (WithRegistryTokenAuth), "" otherwise.
func (r *Registry) TokenRealm() string {
	if r.token == nil {
		return ""
	}
	return r.token.realm()
}
