package mirror

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// brokenSet pushes lib/bad:1, the base layer and a truncated gzip layer (a
// valid blob whose stream ends half-way), and lib/good:1..n, the same base
// layer and a small unique layer each.
func brokenSet(t testing.TB, src *server, baseSize, n int) (base v1.Hash) {
	t.Helper()
	bl, err := testimage.EntriesLayer(testimage.Files("usr/lib/base.bin", pseudoRandom(7, baseSize)))
	if err != nil {
		t.Fatal(err)
	}
	base, _ = bl.Digest()
	whole, err := testimage.EntriesLayer(testimage.Files("app/broken.bin", pseudoRandom(8, 64<<10)))
	if err != nil {
		t.Fatal(err)
	}
	diff, _ := whole.DiffID()
	truncated := &testimage.Layer{Blob: whole.Blob[:len(whole.Blob)/2], Diff: &diff}
	push := func(ref string, ls ...v1.Layer) {
		img, err := testimage.Image(testimage.LinuxAMD64, ls...)
		if err != nil {
			t.Fatal(err)
		}
		r, err := name.ParseReference(ref)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(r, img); err != nil {
			t.Fatal(err)
		}
	}
	push(src.host+"/lib/bad:1", bl, truncated)
	for i := 1; i <= n; i++ {
		u, err := testimage.EntriesLayer(testimage.Files("app/unique.txt", fmt.Sprintf("good %d\n", i)))
		if err != nil {
			t.Fatal(err)
		}
		push(fmt.Sprintf("%s/lib/good:%d", src.host, i), bl, u)
	}
	return base
}

func brokenConfig(t testing.TB, src, dst *server, extra string) *Config {
	t.Helper()
	c, err := ParseConfig([]byte(fmt.Sprintf(`
destination = "%s/mirror"
concurrency = 7
image_attempts = 2
retry_initial = "1ms"
retry_max = "5ms"
%s
[[source]]
repository = "%s/lib/bad"
[[source]]
repository = "%s/lib/good"
`, dst.host, extra, src.host, src.host)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCorruptImageNeverFailsImagesSharingItsBase mirrors a corrupt image
// (its top layer a truncated gzip stream) together with six good images
// sharing its base layer, 20 times, each time into an empty destination so
// the base is converted again: the corrupt image's job, cancelled by its own
// failing layer, must never cancel the shared conversion the good images
// wait for. Every run: six converted, one failed, for its own layer, and no good image
// needs a second attempt.
func TestCorruptImageNeverFailsImagesSharingItsBase(t *testing.T) {
	src := newServer(t)
	brokenSet(t, src, 512<<10, 6)
	runs := 20
	if testing.Short() {
		runs = 5
	}
	for run := range runs {
		dst := newServer(t)
		m := newMirror(t, brokenConfig(t, src, dst, ""))
		rep, err := m.Run(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if rep.Converted != 6 || rep.Failed != 1 {
			for _, ir := range rep.Images {
				t.Log(ir.Summary())
			}
			t.Fatalf("run %d: %d converted, %d failed, want 6 and 1", run, rep.Converted, rep.Failed)
		}
		for _, ir := range rep.Images {
			if ir.Source == src.host+"/lib/bad:1" {
				continue
			}
			// A good image needs no second attempt: none of its own
			// layers is bad.
			if ir.Status != StatusConverted || ir.Attempts != 1 {
				t.Errorf("run %d: good image %s after %d attempt(s): %s", run, ir.Status, ir.Attempts, ir.Reason)
			}
		}
		m.Close()
		dst.Close()
	}
}

// TestLayerFlightOutlivesItsStarter starts a layer flight from caller A,
// lets B join it and cancels A: B still gets the layer from the one
// production. When every caller has gone, the flight's context is
// cancelled.
func TestLayerFlightOutlivesItsStarter(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, brokenConfig(t, src, dst, ""))
	release := make(chan struct{})
	runs := 0
	produce := func(ctx context.Context) (*produced, error) {
		runs++
		select {
		case <-release:
			return &produced{}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	ctxA, cancelA := context.WithCancel(context.Background())
	errA := make(chan error, 1)
	go func() { _, _, err := m.join(ctxA, "k", produce); errA <- err }()
	waitWaiters(t, m, "k", 1)
	errB := make(chan error, 1)
	go func() {
		_, started, err := m.join(context.Background(), "k", produce)
		if started {
			err = fmt.Errorf("B started a second flight")
		}
		errB <- err
	}()
	waitWaiters(t, m, "k", 2)
	cancelA()
	if err := <-errA; err != context.Canceled {
		t.Errorf("A: %v, want context.Canceled", err)
	}
	close(release)
	if err := <-errB; err != nil {
		t.Errorf("B failed after A was cancelled: %v", err)
	}
	if runs != 1 {
		t.Errorf("%d productions, want 1", runs)
	}

	// Every caller gone: the production is cancelled.
	stopped := make(chan error, 1)
	ctxC, cancelC := context.WithCancel(context.Background())
	go func() {
		_, _, _ = m.join(ctxC, "k2", func(ctx context.Context) (*produced, error) {
			<-ctx.Done()
			stopped <- ctx.Err()
			return nil, ctx.Err()
		})
	}()
	waitWaiters(t, m, "k2", 1)
	cancelC()
	if err := <-stopped; err != context.Canceled {
		t.Errorf("abandoned flight ended with %v, want context.Canceled", err)
	}
}

func waitWaiters(t *testing.T, m *Mirror, key string, n int) {
	t.Helper()
	eventually.Require(t, 10*time.Second, fmt.Sprintf("%d caller(s) wait for %s", n, key), func() error {
		m.flightMu.Lock()
		defer m.flightMu.Unlock()
		if f := m.flights[key]; f == nil || f.waiters != n {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}
