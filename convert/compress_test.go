package convert

import (
	"fmt"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// TestGzipCompressorSuite runs estargz's own compression test suite against
// the pooled klauspost compressor: every blob it builds must open, verify and
// read back with the stock eStargz reader.
func TestGzipCompressorSuite(t *testing.T) {
	if testing.Short() {
		t.Skip("the estargz compression suite takes a while; run without -short")
	}
	runner := &estargz.TestRunner{
		TestingT: t,
		Runner: func(tt estargz.TestingT, name string, run func(estargz.TestingT)) {
			tt.(*testing.T).Run(name, func(t *testing.T) { run(t) })
		},
	}
	estargz.CompressionTestSuite(runner, gzipController(1), gzipController(DefaultGzipLevel), gzipController(9))
}

func gzipController(level int) estargz.TestingControllerFactory {
	return func() estargz.TestingController {
		c, err := NewGzipCompressor(level)
		if err != nil {
			panic(err)
		}
		return &gzipTestController{GzipCompressor: c}
	}
}

type gzipTestController struct {
	*GzipCompressor
	estargz.GzipDecompressor
}

func (g *gzipTestController) String() string { return fmt.Sprintf("lazybase-gzip-level-%d", g.level) }

func (g *gzipTestController) TestStreams(t estargz.TestingT, b []byte, streams []int64) {
	estargz.CheckGzipHasStreams(t, b, streams)
}

func (g *gzipTestController) DiffIDOf(t estargz.TestingT, b []byte) string {
	return estargz.GzipDiffIDOf(t, b)
}

func TestNewGzipCompressorRejectsBadLevel(t *testing.T) {
	for _, l := range []int{-1, 0, 10} {
		if _, err := NewGzipCompressor(l); err == nil {
			t.Errorf("level %d: no error", l)
		}
	}
}
