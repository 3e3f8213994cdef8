package testimage

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

// SilentServer starts a loopback TCP listener that accepts every connection
// and never sends a byte: a registry that hangs after the TCP handshake.
// It returns the listener's host:port; the listener and its connections are
// closed when t ends.
func SilentServer(t TB) string {
	t.Helper()
	return silent(t, nil)
}

// SilentTLSServer is SilentServer that first completes a TLS handshake with
// a self-signed certificate for 127.0.0.1 (clients must skip verification),
// then stays silent: a registry that hangs after the TLS handshake.
func SilentTLSServer(t TB) string {
	t.Helper()
	cert, err := selfSigned()
	if err != nil {
		t.Fatal(err)
	}
	return silent(t, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}})
}

func silent(t TB, cfg *tls.Config) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			if cfg != nil {
				// The handshake is the last thing this server says.
				go func() { _ = tls.Server(c, cfg).Handshake() }()
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "silent registry"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// stall is a blob whose GETs stop after some bytes.
type stall struct {
	after int64
}

// Stall makes GETs of the blob dgst answer with the blob's headers and its
// first after bytes, then send nothing more until the client gives up or
// the server closes: a registry that stalls mid-blob. A negative after
// removes the fault. HEAD requests are answered normally.
func (r *Registry) Stall(dgst v1.Hash, after int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if after < 0 {
		delete(r.stalls, dgst.String())
		return
	}
	r.stalls[dgst.String()] = stall{after: after}
}

// serveStalled answers a GET of a stalled blob from the inner handler's
// answer, cut after s.after bytes.
func serveStalled(w http.ResponseWriter, req *http.Request, inner http.Handler, s stall) {
	rec := httptest.NewRecorder()
	inner.ServeHTTP(rec, req)
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	body := rec.Body.Bytes()
	if rec.Code != http.StatusOK {
		w.WriteHeader(rec.Code)
		w.Write(body)
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	w.Write(body[:min(s.after, int64(len(body)))])
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	<-req.Context().Done()
}

// BlackholeServer returns a loopback host:port whose TCP handshake never
// completes: a listening socket with a backlog of 0 that never accepts,
// whose queue is filled first, so the kernel drops further SYNs. Like a
// registry behind a firewall that drops packets. It is closed when t ends.
func BlackholeServer(t TB) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*unix.SockaddrInet4).Port))
	// Fill the accept queue until a connect hangs.
	for range 8 {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Fatalf("the accept queue of %s never filled", addr)
	return ""
}
