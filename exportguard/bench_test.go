package exportguard

import "testing"

// BenchmarkEnsure materializes a fresh 32 MiB blob per iteration from the
// in-process registry over loopback into containerd's local content store.
func BenchmarkEnsure(b *testing.B) {
	const size = 32 << 20
	b.SetBytes(size)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		tr := newTestRegistry(b)
		_, d := tr.push(size)
		s := localStore(b)
		g := newGuard(b, s)
		b.StartTimer()
		if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
			b.Fatal(err)
		}
	}
}
