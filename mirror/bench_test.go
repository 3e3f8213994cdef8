package mirror

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
)

var (
	benchOnce   sync.Once
	benchImages []v1.Image
	benchBytes  int64 // sum over images of their compressed layer sizes
	benchErr    error
)

// words makes n bytes of text from a small vocabulary: compressible about
// as well as typical base image files.
func words(seed uint64, n int) string {
	vocab := strings.Fields("the of lib usr bin share include config value error return static const struct int char void if else for while switch case default break continue sizeof typedef extern unsigned long double float")
	var b strings.Builder
	b.Grow(n + 16)
	x := seed*0x9E3779B97F4A7C15 + 7
	for b.Len() < n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b.WriteString(vocab[x%uint64(len(vocab))])
		if x>>40%11 == 0 {
			b.WriteByte('\n')
		} else {
			b.WriteByte(' ')
		}
	}
	return b.String()[:n]
}

// benchSet is ten images sharing a ~30 MB base layer (half text, half
// incompressible), each with a small unique layer.
func benchSet() ([]v1.Image, int64, error) {
	benchOnce.Do(func() {
		var kv []string
		for i := range 150 {
			kv = append(kv, fmt.Sprintf("usr/share/doc/f%03d.txt", i), words(uint64(i), 100<<10))
			kv = append(kv, fmt.Sprintf("usr/lib/l%03d.so", i), pseudoRandom(uint64(i+1000), 100<<10))
		}
		base, err := testimage.EntriesLayer(testimage.Files(kv...))
		if err != nil {
			benchErr = err
			return
		}
		for i := range 10 {
			u, err := testimage.EntriesLayer(testimage.Files("app/data.txt", words(uint64(5000+i), 512<<10)))
			if err != nil {
				benchErr = err
				return
			}
			img, err := testimage.Image(testimage.LinuxAMD64, base, u)
			if err != nil {
				benchErr = err
				return
			}
			m, _ := img.Manifest()
			for _, l := range m.Layers {
				benchBytes += l.Size
			}
			benchImages = append(benchImages, img)
		}
	})
	return benchImages, benchBytes, benchErr
}

func pushSet(b *testing.B, imgs []v1.Image) *server {
	src := newServer(b)
	for i, img := range imgs {
		ref, _ := name.ParseReference(fmt.Sprintf("%s/lib/app:1.%d", src.host, i))
		if err := remote.Write(ref, img); err != nil {
			b.Fatal(err)
		}
	}
	return src
}

// BenchmarkMirrorVsConvert mirrors ten images sharing a 30 MB base layer
// with one Mirror, and, in the same run, converts the same ten images the
// way a loop of `lazybase convert` does (a fresh Converter per image, in
// sequence), into fresh destination registries each time. It reports
// images/min and source MB/s for both and the ratio.
func BenchmarkMirrorVsConvert(b *testing.B) {
	imgs, total, err := benchSet()
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	var mirrorT, loopT, rerunT time.Duration
	for range b.N {
		b.StopTimer()
		src, dst := pushSet(b, imgs), newServer(b)
		c, err := ParseConfig([]byte(fmt.Sprintf("destination = %q\nconcurrency = 4\n[[source]]\nrepository = %q\n", dst.host+"/mirror", src.host+"/lib/app")))
		if err != nil {
			b.Fatal(err)
		}
		m, err := New(c, WithKeychain(authn.NewMultiKeychain()))
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start := time.Now()
		rep, err := m.Run(ctx)
		mirrorT += time.Since(start)
		b.StopTimer()
		m.Close()
		if err != nil || !rep.OK() || rep.Converted != 10 {
			b.Fatalf("mirror: %v %+v", err, rep)
		}
		// A second run, as the next CronJob would make it: all skipped.
		m2, err := New(c, WithKeychain(authn.NewMultiKeychain()))
		if err != nil {
			b.Fatal(err)
		}
		start = time.Now()
		rep, err = m2.Run(ctx)
		rerunT += time.Since(start)
		m2.Close()
		if err != nil || rep.Skipped != 10 {
			b.Fatalf("second mirror run: %v %+v", err, rep)
		}

		// The baseline: one `lazybase convert` per image, in sequence.
		dst2 := newServer(b)
		client, err := imageio.New(imageio.WithKeychain(authn.NewMultiKeychain()))
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start = time.Now()
		for i := range imgs {
			sref, _ := client.ParseRef(fmt.Sprintf("%s/lib/app:1.%d", src.host, i))
			dref, _ := client.ParseRef(fmt.Sprintf("%s/mirror/lib/app:1.%d", dst2.host, i))
			s, err := client.Open(ctx, sref)
			if err != nil {
				b.Fatal(err)
			}
			conv, err := convert.New()
			if err != nil {
				b.Fatal(err)
			}
			res, err := conv.Image(ctx, s.Image)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := client.Write(ctx, dref, res.Image, nil); err != nil {
				b.Fatal(err)
			}
			conv.Close()
		}
		loopT += time.Since(start)
		b.StopTimer()
	}
	n := float64(b.N)
	mirrorPerMin := 10 * 60 / (mirrorT.Seconds() / n)
	loopPerMin := 10 * 60 / (loopT.Seconds() / n)
	mb := float64(total) / 1e6
	b.ReportMetric(mirrorPerMin, "mirror-images/min")
	b.ReportMetric(loopPerMin, "convert-loop-images/min")
	b.ReportMetric(mb/(mirrorT.Seconds()/n), "mirror-MB/s")
	b.ReportMetric(mb/(loopT.Seconds()/n), "convert-loop-MB/s")
	b.ReportMetric(loopT.Seconds()/mirrorT.Seconds(), "speedup")
	b.ReportMetric(10*60/(rerunT.Seconds()/n), "mirror-rerun-images/min")
	b.Logf("second mirror run (all ten up to date): %.3fs", rerunT.Seconds()/n)
	b.Logf("ten images, %.1f MB of source layers (as referenced): mirror %.2fs (%.0f images/min, %.1f MB/s); convert loop %.2fs (%.0f images/min, %.1f MB/s); ratio %.1fx",
		mb, mirrorT.Seconds()/n, mirrorPerMin, mb/(mirrorT.Seconds()/n), loopT.Seconds()/n, loopPerMin, mb/(loopT.Seconds()/n), loopT.Seconds()/mirrorT.Seconds())
}
